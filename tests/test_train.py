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
from checkpoint import checkpoint_files, read_checkpoint

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
    return read_checkpoint(str(out))['model']


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
    preempt(args_for(folder, cut, **common), 'cut 80/')  # wait for training to be under way
    stopped_at = read_checkpoint(str(cut))['samples_seen']
    assert 80 <= stopped_at < 320
    run(args_for(folder, cut, init_from='resume', **common))
    a, b = (read_checkpoint(str(p)) for p in (tmp_path / 'full', cut))
    for part in ('model', 'ema'):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])  # bitwise on CPU


def test_labelled_shards_stage_resumes_exactly(folder, tmp_path):
    # the ImageNet pre-training configs' data path: make_shards.py, then data='shards' with 2 workers
    import make_shards
    man = make_shards.main([str(folder / 'train'), str(tmp_path / 'shards'), '--shard_size', '20', '--workers', '1'])
    common = dict(data='shards', train_data=man['pattern'], samples=192, log_every=8, num_workers=2,
                  shuffle_buffer=16, pgd_steps=1, mixup=0.4, final_eval_samples=6)
    run(args_for(folder, tmp_path / 'full', **common))
    cut = tmp_path / 'cut'
    preempt(args_for(folder, cut, **common), 'cut 64/')
    assert 64 <= read_checkpoint(str(cut))['samples_seen'] < 192
    assert 'resumed' in run(args_for(folder, cut, **common)).stdout
    a, b = (read_checkpoint(str(p)) for p in (tmp_path / 'full', cut))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])  # bitwise on CPU
    assert [r['loss'] for r in records(cut) if 'loss' in r] == [r['loss'] for r in records(tmp_path / 'full')
                                                                if 'loss' in r]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(args, restarts=0):
    """The command for train.py on 2 gloo ranks under torchrun."""
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--max-restarts={restarts}',
            f'--master_port={free_port()}', 'train.py', *args]


def run2(args, timeout=600):
    r = subprocess.run(torchrun(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_ranks_equal_one_rank_with_the_same_global_batch(folder, tmp_path):
    common = dict(samples=96, batch_size=8, pgd_steps=1, pgd_random_start=False, final_eval_samples=6)
    run(args_for(folder, tmp_path / 'one', micro_batch_size=4, **common))  # 1 rank, 2 accumulation steps
    r = run2(args_for(folder, tmp_path / 'two', **common))
    assert '2 rank(s) x 4 x 1 accumulation' in r.stdout
    a, b = weights(tmp_path / 'one'), weights(tmp_path / 'two')
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # every logged scalar is the global one, whatever the number of ranks (the loss was once x world)
    one, two = records(tmp_path / 'one'), records(tmp_path / 'two')
    assert len(one) == len(two) > 3
    for r1, r2 in zip(one, two):
        keys = set(r1) - {'img_per_s', 'stage'}
        assert keys == set(r2) - {'img_per_s', 'stage'}
        for k in keys:
            assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-6), (k, r1, r2)


def test_compile_ddp_grad_ckpt_and_accumulation_train_like_eager(folder, tmp_path):
    """The GPU recipe's combination on CPU: torch.compile under DDP (2 gloo ranks) with activation
    checkpointing and gradient accumulation; the weights match the eager run."""
    common = dict(samples=32, batch_size=8, micro_batch_size=2, pgd_steps=1, grad_ckpt=True, drop_path_rate=0.1,
                  final_eval_samples=6, eval_every=0)
    for name, comp in (('eager', False), ('compiled', True)):
        r = run2(args_for(folder, tmp_path / name, compile=comp, **common), timeout=900)
        assert '2 rank(s) x 2 x 2 accumulation' in r.stdout
    a, b = weights(tmp_path / 'eager'), weights(tmp_path / 'compiled')
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_final_metrics_in_fp32_under_bf16_training(folder, tmp_path):
    r = run(args_for(folder, tmp_path / 'b', dtype='bfloat16', samples=32, eval_every=16, final_eval_samples=6))
    assert 'PGD-20' in r.stdout and '(bfloat16)' in r.stdout  # interim evaluations say they ran in bf16
    res = json.load(open(tmp_path / 'b' / 'results.json'))
    assert res['eval_dtype'] == 'float32'
    assert [rec.get('eval_dtype') for rec in records(tmp_path / 'b') if 'clean_acc' in rec][0] == 'bfloat16'


def test_new_stage_from_checkpoint_at_another_resolution_and_head(folder, tmp_path):
    run(args_for(folder, tmp_path / 's1', samples=32, final_eval_samples=6))
    r = run(args_for(folder, tmp_path / 's5', init_from=str(tmp_path / 's1'), img_size=32, samples=16,
                     pgd_steps=3, pgd_step_size=3 / 255, num_classes=5, final_eval_samples=6))
    assert 'new head' in r.stdout  # another class count: the backbone is kept, the head is new
    assert read_checkpoint(str(tmp_path / 's5'))['model']['head.weight'].shape[0] == 5
    r = run(args_for(folder, tmp_path / 's2', init_from=str(tmp_path / 's1'), img_size=32, samples=16,
                     pgd_steps=3, pgd_step_size=3 / 255, final_eval_samples=6))
    assert 'new head' not in r.stdout
    ck = read_checkpoint(str(tmp_path / 's2'))
    assert ck['model_args']['img_size'] == 32 and ck['model']['pos_embed'].shape[1] == 1 + 64
    assert ck['compute_prev'] > 0  # the first stage's compute is carried into the total
    res = json.load(open(tmp_path / 's2' / 'results.json'))
    assert res['img_size'] == 32 and res['compute_1e10'] > ck['compute_prev']
    assert records(tmp_path / 's2')[-1]['samples_total'] == 32 + 16  # plot.py's axis continues across stages


def test_convnext_two_stages_and_no_masking(folder, tmp_path):
    """Table 3's architecture through the same loop: 16 px stage, then 32 px with a new head."""
    run(args_for(folder, tmp_path / 'c1', model='convnext_demo', samples=32, final_eval_samples=6, drop_path_rate=0.1))
    r = run(args_for(folder, tmp_path / 'c2', init_from=str(tmp_path / 'c1'), model='convnext_demo', img_size=32,
                     samples=16, num_classes=5,
                     pgd_steps=2, pgd_step_size=2 / 255, final_eval_samples=6))
    assert 'new head' in r.stdout and 'ConvNeXt' in r.stdout
    ck = read_checkpoint(str(tmp_path / 'c2'))
    assert ck['model']['head.fc.weight'].shape[0] == 5 and ck['model_args']['img_size'] == 32
    c1 = read_checkpoint(str(tmp_path / 'c1'))['model']
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


def preempt(args, after_line):
    """Start train.py, SIGTERM it once a stdout line starts with after_line; its output."""
    p = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith(after_line):
            p.send_signal(signal.SIGTERM)
            break
    rest = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and 'checkpoint written' in rest, rest
    return rest


def file_bytes(out):
    return {f: open(f, 'rb').read() for f in checkpoint_files(str(out))}


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(folder, tmp_path):
    out = tmp_path / 'nan'
    args = args_for(folder, out, samples=64, log_every=8, ckpt_every=8)
    preempt(args, 'nan 16/')
    good = file_bytes(out)  # the preempted run's checkpoints
    assert good and read_checkpoint(str(out))['samples_seen'] < 64
    r = run(args + ['--lr=1e30', '--warmup_samples=0'], check=False)  # the same stage resumed, now diverging
    assert r.returncode == 1 and 'NaN' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    newest_good = max(good)  # ckpt-<samples>.pt names sort by samples
    assert file_bytes(out).get(newest_good) == good[newest_good]  # the last good checkpoint survives as it was
    for f in checkpoint_files(str(out)):  # and none holds non-finite weights
        assert all(torch.isfinite(v).all() for v in read_checkpoint(f)['model'].values())


def test_missing_data_is_one_line(tmp_path):
    r = run(['--data=imagefolder', f'--train_data={tmp_path}/nope', f'--val_data={tmp_path}/nope',
             f'--out_dir={tmp_path}/o'], check=False)
    assert r.returncode == 1 and 'data folder not found' in r.stderr and len(r.stderr.strip().splitlines()) == 1


def dry_run(*argv, plan=False):
    """train.py --dry_run in this process (much faster than a subprocess per config): its
    key=value lines (compute_1e10_gflops, and peak_mem_gib with plan=True). A stage that starts
    from another run is planned alone (--init_from=scratch, as its refusal says): that run is not
    here (tests/test_commands.py dry-runs each documented transition against a stand-in)."""
    out, old = io.StringIO(), (sys.argv, os.getcwd())
    sys.argv = ['train.py', *argv, '--dry_run=True', f'--plan_memory={plan}']
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            runpy.run_path('train.py', run_name='__main__')
    finally:
        sys.argv, _ = old
        os.chdir(old[1])
    if str(e.value.code).endswith('plan this stage alone with --init_from=scratch'):
        return dry_run(*argv, '--init_from=scratch', plan=plan)
    assert e.value.code in (0, None), out.getvalue()
    return {k: float(v.split()[0]) for k, _, v in (l.partition('=') for l in out.getvalue().splitlines())
            if k in ('compute_1e10_gflops', 'peak_mem_gib')}


def compute(*argv):
    return dry_run(*argv)['compute_1e10_gflops']


PAPER_CONFIGS = sorted(c[:-3] for c in os.listdir(os.path.join(ROOT, 'config')) if not c.startswith('demo'))


def test_every_config_dry_runs():
    for cfg in sorted(os.listdir(os.path.join(ROOT, 'config'))):
        assert compute(f'config/{cfg}') >= 0


@pytest.mark.parametrize('cfg', PAPER_CONFIGS)
def test_paper_configs_fit_80gb_gpus(cfg):
    """Every paper config's memory plan (bytes autograd saves, measured) fits an 80 GB GPU at 8 GPUs."""
    r = dry_run(f'config/{cfg}.py', plan=True)
    assert 0 < r['peak_mem_gib'] <= 80, r


@pytest.mark.parametrize('pre,ft,paper', [
    ('advxl_vitb_in1k', ['advxl_ft_in1k'], 0.5),
    ('advxl_vitl_in1k', ['advxl_ft_in1k_vitl'], 1.7),
    ('advxl_vith_in1k', ['advxl_ft_in1k_vith'], 5.7),
    ('advxl_vitl_in21k', ['advxl_ft_in1k_vitl'], 1.7),
    ('advxl_vitl_in21k_long', ['advxl_ft_in1k_vitl'], 3.4),
    ('advxl_vith_in21k_long', ['advxl_ft_in1k_vith'], 8.1),
    ('advxl_vitl_laion', ['advxl_ft_in1k_vitl'], 8.8),
    ('advxl_vith_datacomp', ['advxl_ft_in1k_vith'], 38.6),
    ('advxl_vith_datacomp', ['advxl_ft_in1k_vith', 'advxl_ft336_in1k_vith'], 39.6),
    ('advxl_vitg_datacomp', ['advxl_ft_in1k_vitg', 'advxl_ft336_in1k_vitg'], 63.4)])
def test_dry_run_compute_matches_the_paper(pre, ft, paper):
    total = compute(f'config/{pre}.py') + sum(compute(f'config/{f}.py') for f in ft)
    assert abs(total - paper) / paper < 0.03, total


@pytest.mark.parametrize('pre,ft,macs_224', [('advxl_convnext_b_in1k', 'advxl_ft_in1k_convnext_b', 15.4e9),
                                             ('advxl_convnext_l_laion', 'advxl_ft_in1k_convnext_l', 34.4e9)])
def test_convnext_table3_compute(pre, ft, macs_224):
    """Table 3's ConvNeXt rows, same schedule as the ViT rows: within 3% of the figure from the
    published (fvcore) MACs at 224, scaled by pixel count to 112 px."""
    samples_pre = 256e6 if 'in1k' in pre else 2.56e9
    expected = (samples_pre * macs_224 / 4 * 2 + 38.4e6 * macs_224 * 4) / 1e19
    total = compute(f'config/{pre}.py') + compute(f'config/{ft}.py')
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
    ck = read_checkpoint(str(tmp_path / 'e'))
    assert not any(torch.equal(ck['ema'][k], ck['model'][k]) for k in ('head.weight', 'pos_embed'))
