"""Joint adversarial CLIP pre-training (train_text_tower=True): both towers train on the demo's
webdataset shards with real (tiny, random-init) open_clip text towers, under DDP too; the run
resumes bitwise, hands its trained text tower on, and refuses what cannot work with it."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import demo_data
from checkpoint import checkpoint_files, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    return demo_data.ensure_demo(str(tmp_path_factory.mktemp('demo')), n_train=600, n_val=100, shard_size=100)


def joint_args(root, out, *extra):
    return ['config/demo_clip_joint.py', f"--train_data={root}/shards/train-{{0000..0005}}.tar",
            f'--val_data={root}/val', '--batch_size=16', '--samples=128', '--log_every=32', '--warmup_samples=32',
            '--eps_warmup=64', '--num_workers=1', '--shuffle_buffer=50', '--ckpt_every=64', '--eval_every=64',
            '--eval_samples=32', '--final_eval_samples=32', f'--out_dir={out}', *extra]


def train(args, launcher=(sys.executable,)):
    r = subprocess.run([*launcher, 'train.py', *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def losses(out):
    return [json.loads(l)['loss'] for l in open(os.path.join(out, 'log.jsonl')) if '"loss"' in l]


def resumed_from_the_first_checkpoint(full, cut, args_for, launcher=(sys.executable,)):
    """cut = full's folder without its newest checkpoint and results: the same command resumes
    from the older checkpoint; returns both final checkpoints."""
    shutil.copytree(full, cut)
    newest = checkpoint_files(str(cut))[-1]
    os.remove(newest)
    os.remove(os.path.join(cut, 'results.json'))
    r = train(args_for(cut), launcher)
    assert 'resumed' in r.stdout and read_checkpoint(str(full))['samples_seen'] == 128
    return read_checkpoint(str(full)), read_checkpoint(str(cut))


def assert_same_run(a, b, full, cut):
    for part in ('model', 'text_model', 'contrastive'):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part  # bitwise on CPU
    assert torch.equal(a['zeroshot_weights'], b['zeroshot_weights'])
    assert losses(cut) == losses(full)


def test_both_towers_train_and_a_resumed_run_is_bitwise_the_same(shards, tmp_path):
    from clip_head import TextTower, zeroshot_weights
    from open_clip_interop import load_text_tower
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    train(joint_args(shards, full))
    a, b = resumed_from_the_first_checkpoint(full, cut, lambda out: joint_args(shards, out))
    assert_same_run(a, b, full, cut)
    # the text tower trained (it starts as the config's random tower)...
    start = load_text_tower('tiny-text-w256', None, seed=a['config']['text_seed'])
    moved = [k for k, v in start.clip.state_dict().items() if not torch.equal(v, a['text_model'][k])]
    assert 'token_embedding.weight' in moved and any(k.startswith('transformer.') for k in moved)
    assert torch.equal(start.clip.logit_scale, a['text_model']['logit_scale'])  # CLIP's own: frozen
    # ...and the stored zero-shot classifier is the trained tower's, as eval_autoattack reads it
    start.clip.load_state_dict(a['text_model'])
    tower = TextTower(start.clip, start.tokenizer, 'tiny-text-w256', None, 256)
    import data
    want = zeroshot_weights(tower, data.class_names(f'{shards}/val'), list(a['config']['prompt_templates']))
    torch.testing.assert_close(a['zeroshot_weights'], want, rtol=1e-5, atol=1e-6)
    # exported for open_clip, the folder's text tower is the trained one
    import export
    import open_clip
    hub = export.main([str(full), '--to', 'open_clip', '--out', str(tmp_path / 'hub')])
    clip = open_clip.create_model_and_transforms('local-dir:' + hub)[0].eval()
    tokens = start.tokenizer(['star: a small red star on dots', 'a ring'])
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(tokens), start.clip.encode_text(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # about 40 s on 2 cores; the one-process resume runs by default
def test_two_ranks_train_both_towers_and_resume_bitwise(shards, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}')
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    r = train(joint_args(shards, full), launcher)
    assert '2 rank(s) x 8 x 1 accumulation' in r.stdout
    launcher = launcher[:-1] + (f'--master_port={port + 1}',)
    a, b = resumed_from_the_first_checkpoint(full, cut, lambda out: joint_args(shards, out), launcher)
    assert_same_run(a, b, full, cut)


def test_a_labelled_stage_starts_from_the_trained_text_towers_zero_shot_head(shards, tmp_path):
    train(joint_args(shards, tmp_path / 'joint', '--samples=64'))
    clean = json.load(open(tmp_path / 'joint' / 'results.json'))['clean_acc']
    r = train(['--data=imagefolder', f'--train_data={shards}/train', f'--val_data={shards}/val',
               f'--init_from={tmp_path}/joint', '--samples=0', '--final_eval_samples=32', '--num_workers=0',
               f'--out_dir={tmp_path}/ft'])
    assert 'zero-shot classifier' in r.stdout
    # samples=0: the labelled head is exactly the trained text tower's zero-shot classifier (same argmax)
    assert json.load(open(tmp_path / 'ft' / 'results.json'))['clean_acc'] == pytest.approx(clean, abs=0.01)


@pytest.mark.parametrize('extra,says', [
    (['--caption_embeddings=emb.pt'], 'drop caption_embeddings'),
    (['--data=demo'], "use data='webdataset'"),
])
def test_what_a_trained_text_tower_cannot_use_is_refused_in_one_line(extra, says):
    r = subprocess.run([sys.executable, 'train.py', 'config/demo_clip_joint.py', *extra, '--dry_run=True'], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_memory_plan_counts_the_trained_text_tower():
    import memplan
    from model import create_model
    from dataclasses import asdict
    args = asdict(create_model('vit_demo_patch4', img_size=16, embed_out=256).config)
    frozen = memplan.memory_plan(args, 64, 16, 1, dtype='bfloat16', text_tower='tiny-text-w256')
    joint = memplan.memory_plan(args, 64, 16, 1, dtype='bfloat16', text_tower='tiny-text-w256', train_text=True)
    n = memplan.tower_params('tiny-text-w256')
    assert frozen['text_tower'] == 2 * n and joint['text_tower'] == 16 * n  # bf16 weights vs fp32 weights+grads+AdamW
    assert joint['text_activations_kept'] == memplan.text_activation_bytes('tiny-text-w256', 64) > 0
    assert joint['peak'] == frozen['peak'] + 14 * n + joint['text_activations_kept']
