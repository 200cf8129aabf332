"""End-to-end checks of train.py on a tiny generated ImageFolder (real files, real DDP)."""
import contextlib
import io
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny models: one thread each beats oversubscribed cores


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """3 classes told apart by a bright bar's orientation, 32 px; 48 train and 12 val images each."""
    root = tmp_path_factory.mktemp('imgs')
    rng = np.random.default_rng(0)
    for split, n in (('train', 48), ('val', 12)):
        for c in range(3):
            os.makedirs(root / split / f'c{c}')
            for i in range(n):
                img = rng.uniform(0, 0.3, (32, 32, 3))
                o = rng.integers(8, 24)
                if c == 0:
                    img[o - 3:o + 3, 4:28] = 0.9
                elif c == 1:
                    img[4:28, o - 3:o + 3] = 0.9
                else:
                    for k in range(-3, 3):
                        idx = np.arange(4, 28)
                        img[idx, np.clip(idx + k, 0, 31)] = 0.9
                Image.fromarray((img * 255).astype(np.uint8)).save(root / split / f'c{c}' / f'{i}.png')
    return root


def args_for(folder, out, **kw):
    base = dict(data='imagefolder', train_data=str(folder / 'train'), val_data=str(folder / 'val'),
                model='vit_pico_patch4', img_size=16, num_classes=3, batch_size=8, samples=64, log_every=16,
                num_workers=0, eval_samples=12, final_eval_samples=24, eps_warmup=0, warmup_samples=16,
                out_dir=str(out))
    base.update(kw)
    return [f'--{k}={v}' for k, v in base.items()]


def run(args, check=True, env=None):
    r = subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**ENV, **(env or {})})
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def weights(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['model']


def records(out):
    return [json.loads(l) for l in open(os.path.join(out, 'log.jsonl'))]


def test_training_lowers_the_loss_and_writes_results(folder, tmp_path):
    out = tmp_path / 'run'
    run(args_for(folder, out, samples=960, lr=3e-3, pgd_steps=1, eps=2 / 255, pgd_step_size=2 / 255, log_every=192,
                  crop_scale=(0.8, 1.0), hflip=False))
    losses = [r['loss'] for r in records(out) if 'loss' in r]
    assert losses[-1] < losses[0] - 0.1, losses
    res = json.load(open(out / 'results.json'))
    assert {'clean_acc', 'pgd20_acc', 'eps', 'samples', 'wall_s'} <= set(res)
    assert res['samples'] == 960 and res['eps'] == pytest.approx(2 / 255)
    assert 0 <= res['pgd20_acc'] <= res['clean_acc'] <= 100
    rec = records(out)[0]
    assert {'stage', 'samples', 'loss', 'adv_acc', 'lr', 'img_per_s', 'compute_1e10'} <= set(rec)


def test_sigterm_then_resume_equals_uninterrupted(folder, tmp_path):
    common = dict(samples=320, log_every=8, num_workers=1, pgd_steps=1, drop_path_rate=0.1, mixup=0.4,
                  ema_decay=0.9, final_eval_samples=6)
    run(args_for(folder, tmp_path / 'full', **common))
    cut = tmp_path / 'cut'
    p = subprocess.Popen([sys.executable, 'train.py', *args_for(folder, cut, **common)], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:  # wait for training to be under way, then preempt it
        if line.startswith('cut 80/'):
            p.send_signal(signal.SIGTERM)
            break
    rest = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and 'SIGTERM: checkpoint written' in rest, rest
    stopped_at = torch.load(cut / 'ckpt.pt', weights_only=True)['samples_seen']
    assert 80 <= stopped_at < 320
    run(args_for(folder, cut, init_from='resume', **common))
    a, b = (torch.load(p / 'ckpt.pt', weights_only=True) for p in (tmp_path / 'full', cut))
    for part in ('model', 'ema'):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])  # bitwise on CPU


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_rank_with_the_same_global_batch(folder, tmp_path):
    common = dict(samples=96, batch_size=8, pgd_steps=1, pgd_random_start=False, final_eval_samples=6)
    run(args_for(folder, tmp_path / 'one', micro_batch_size=4, **common))  # 1 rank, 2 accumulation steps
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           'train.py', *args_for(folder, tmp_path / 'two', **common)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '2 rank(s) x 4 x 1 accumulation' in r.stdout
    a, b = weights(tmp_path / 'one'), weights(tmp_path / 'two')
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_new_stage_from_checkpoint_at_another_resolution_and_head(folder, tmp_path):
    run(args_for(folder, tmp_path / 's1', samples=32, final_eval_samples=6))
    r = run(args_for(folder, tmp_path / 's5', init_from=str(tmp_path / 's1'), img_size=32, samples=16,
                     pgd_steps=3, pgd_step_size=3 / 255, num_classes=5, final_eval_samples=6))
    assert 'new head' in r.stdout  # another class count: the backbone is kept, the head is new
    assert torch.load(tmp_path / 's5' / 'ckpt.pt', weights_only=True)['model']['head.weight'].shape[0] == 5
    r = run(args_for(folder, tmp_path / 's2', init_from=str(tmp_path / 's1'), img_size=32, samples=16,
                     pgd_steps=3, pgd_step_size=3 / 255, final_eval_samples=6))
    assert 'new head' not in r.stdout
    ck = torch.load(tmp_path / 's2' / 'ckpt.pt', weights_only=True)
    assert ck['model_args']['img_size'] == 32 and ck['model']['pos_embed'].shape[1] == 1 + 64
    assert ck['compute_prev'] > 0  # the first stage's compute is carried into the total
    res = json.load(open(tmp_path / 's2' / 'results.json'))
    assert res['img_size'] == 32 and res['compute_1e10'] > ck['compute_prev']
    assert records(tmp_path / 's2')[-1]['samples_total'] == 32 + 16  # plot.py's axis continues across stages


def test_convnext_two_stages_and_no_masking(folder, tmp_path):
    """Table 3's architecture through the same loop: 16 px stage, then 32 px with a new head."""
    run(args_for(folder, tmp_path / 'c1', model='convnext_demo', samples=32, final_eval_samples=6, drop_path_rate=0.1))
    r = run(args_for(folder, tmp_path / 'c2', init_from=str(tmp_path / 'c1'), img_size=32, samples=16, num_classes=5,
                     pgd_steps=2, pgd_step_size=2 / 255, final_eval_samples=6))
    assert 'new head' in r.stdout and 'ConvNeXt' in r.stdout
    ck = torch.load(tmp_path / 'c2' / 'ckpt.pt', weights_only=True)
    assert ck['model']['head.fc.weight'].shape[0] == 5 and ck['model_args']['img_size'] == 32
    c1 = torch.load(tmp_path / 'c1' / 'ckpt.pt', weights_only=True)['model']
    assert not torch.equal(c1['stem.0.weight'], ck['model']['stem.0.weight'])  # the backbone trained on
    r = run(args_for(folder, tmp_path / 'm', model='convnext_demo', mask_ratio=0.5), check=False)
    assert r.returncode == 1 and 'masking is a ViT token operation' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_corrupt_images_are_skipped_and_counted(folder, tmp_path):
    import shutil
    bad = tmp_path / 'bad'
    shutil.copytree(folder, bad)
    for i in range(2):
        (bad / 'train' / 'c0' / f'broken{i}.png').write_bytes(b'\x89PNG not really')
    run(args_for(bad, tmp_path / 'ok', samples=288, max_bad_frac=0.05, log_every=144))
    # the broken files the stream actually drew in 288 samples (each pass drops a ragged tail)
    ds = data.ImageFolderSafe(str(bad / 'train'), None)
    broken = {i for i, (path, _) in enumerate(ds.samples) if 'broken' in path}
    stream = iter(data.SampleStream(len(ds), 8, seed=0))
    drawn = sum(next(stream)[0] in broken for _ in range(288))
    assert drawn > 0 and records(tmp_path / 'ok')[-2]['bad_images'] == drawn
    r = run(args_for(bad, tmp_path / 'strict', samples=288, max_bad_frac=0.0, log_every=144), check=False)
    assert r.returncode == 1 and 'unreadable images' in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(folder, tmp_path):
    out = tmp_path / 'nan'
    run(args_for(folder, out, samples=16))
    good = weights(out)
    r = run(args_for(folder, out, init_from='resume', samples=64, lr=1e30, warmup_samples=0, log_every=8,
                     ckpt_every=8), check=False)
    assert r.returncode == 1 and 'NaN' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    after = weights(out)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.equal(good[k], after[k]) for k in good) or torch.load(out / 'ckpt.pt')['samples_seen'] > 16


def test_missing_data_is_one_line(tmp_path):
    r = run(['--data=imagefolder', f'--train_data={tmp_path}/nope', f'--val_data={tmp_path}/nope',
             f'--out_dir={tmp_path}/o'], check=False)
    assert r.returncode == 1 and 'data folder not found' in r.stderr and len(r.stderr.strip().splitlines()) == 1


def dry_run(*argv):
    """train.py --dry_run in this process (much faster than a subprocess per config)."""
    out, old = io.StringIO(), (sys.argv, os.getcwd())
    sys.argv = ['train.py', *argv, '--dry_run=True']
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            runpy.run_path('train.py', run_name='__main__')
    finally:
        sys.argv, _ = old
        os.chdir(old[1])
    assert e.value.code in (0, None), out.getvalue()
    return float(out.getvalue().strip().splitlines()[-1].split('=')[1])


def test_every_config_dry_runs():
    for cfg in sorted(os.listdir(os.path.join(ROOT, 'config'))):
        extra = ['--model=vit_base_patch16'] if ('ft' in cfg and 'demo' not in cfg) else []
        assert dry_run(f'config/{cfg}', *extra) >= 0


@pytest.mark.parametrize('pre,arch,ft,paper', [
    ('advxl_vitb_in1k', 'vit_base_patch16', ['advxl_ft_in1k'], 0.5),
    ('advxl_vitl_in1k', 'vit_large_patch16', ['advxl_ft_in1k'], 1.7),
    ('advxl_vith_in1k', 'vit_huge_patch14', ['advxl_ft_in1k'], 5.7),
    ('advxl_vitl_in21k', 'vit_large_patch16', ['advxl_ft_in1k'], 1.7),
    ('advxl_vitl_in21k_long', 'vit_large_patch16', ['advxl_ft_in1k'], 3.4),
    ('advxl_vith_in21k_long', 'vit_huge_patch14', ['advxl_ft_in1k'], 8.1),
    ('advxl_vitl_laion', 'vit_large_patch16', ['advxl_ft_in1k'], 8.8),
    ('advxl_vith_datacomp', 'vit_huge_patch14', ['advxl_ft_in1k'], 38.6),
    ('advxl_vith_datacomp', 'vit_huge_patch14', ['advxl_ft_in1k', 'advxl_ft336_in1k'], 39.6),
    ('advxl_vitg_datacomp', 'vit_giant_patch14', ['advxl_ft_in1k', 'advxl_ft336_in1k'], 63.4)])
def test_dry_run_compute_matches_the_paper(pre, arch, ft, paper):
    total = dry_run(f'config/{pre}.py') + sum(dry_run(f'config/{f}.py', f'--model={arch}') for f in ft)
    assert abs(total - paper) / paper < 0.03, total


@pytest.mark.parametrize('pre,arch,macs_224', [('advxl_convnext_b_in1k', 'convnext_base', 15.4e9),
                                                ('advxl_convnext_l_laion', 'convnext_large', 34.4e9)])
def test_convnext_table3_compute(pre, arch, macs_224):
    """Table 3's ConvNeXt rows, same schedule as the ViT rows: within 3% of the figure from the
    published (fvcore) MACs at 224, scaled by pixel count to 112 px."""
    samples_pre = 256e6 if 'in1k' in pre else 2.56e9
    expected = (samples_pre * macs_224 / 4 * 2 + 38.4e6 * macs_224 * 4) / 1e19
    total = dry_run(f'config/{pre}.py') + dry_run('config/advxl_ft_in1k.py', f'--model={arch}')
    assert abs(total - expected) / expected < 0.03, (total, expected)


def test_compiled_model_trains_on_cpu(folder, tmp_path):
    """compile=True: attacks and training go through torch.compile's module (inductor on CPU)."""
    r = run(args_for(folder, tmp_path / 'c', compile=True, samples=32, final_eval_samples=6, eval_every=16),
            env={'TORCH_LOGS': 'recompiles'})
    assert 'c 32/32' in r.stdout and os.path.exists(tmp_path / 'c' / 'results.json')
    # one graph for the attack (eval mode, frozen weights), one for training: compiled once per stage
    assert r.stderr.count('Recompiling function') == 1, r.stderr[-3000:]


def test_ema_weights_stay_leaves(folder, tmp_path):
    """The EMA update runs without autograd: its weights stay leaves that need no grad (an
    update recorded by autograd chains every step onto the last, a graph that grows all run,
    and the final PGD-20 on the EMA model fails when the attack freezes its weights)."""
    run(args_for(folder, tmp_path / 'e', samples=24, ema_decay=0.5, final_eval_samples=6))
    ck = torch.load(tmp_path / 'e' / 'ckpt.pt', weights_only=True)
    assert not any(torch.equal(ck['ema'][k], ck['model'][k]) for k in ('head.weight', 'pos_embed'))
