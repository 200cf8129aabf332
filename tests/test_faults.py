"""Runs that survive a cluster: real processes killed, preempted and restarted with the same
command (gloo on CPU), damaged and half-written checkpoints, a full disk. Each ends with the
weights of an uninterrupted run (bitwise on CPU) or with the previous checkpoint intact."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
from bench import child_pids
from checkpoint import checkpoint_files, read_checkpoint
from test_train import ENV, ROOT, args_for, folder, run, run2  # noqa: F401 (folder is a fixture)
from test_train import torchrun as torchrun_cmd

STAGE = dict(samples=384, batch_size=8, log_every=32, ckpt_every=32, num_workers=0, final_eval_samples=6,
             eval_samples=6, mixup=0.4, drop_path_rate=0.1, ema_decay=0.9)


def wait_for(cond, proc, timeout=300):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, 'the run ended before the fault could be injected'
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def newest_samples(out):
    files = checkpoint_files(str(out))
    return int(os.path.basename(files[0])[5:-3]) if files else -1


def worker_pids(parent):
    """The train.py processes torchrun started (children of its agent)."""
    pids = []
    for p in child_pids(parent):
        try:
            if 'train.py' in open(f'/proc/{p}/cmdline').read():
                pids.append(p)
        except OSError:
            continue
    return sorted(pids)


def assert_same_weights(a, b):
    a, b = read_checkpoint(str(a)), read_checkpoint(str(b))
    assert a['samples_seen'] == b['samples_seen']
    for part in ('model', 'ema'):
        if a[part] is not None:
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part  # bitwise on CPU


def logged_once(out):
    samples = [r['samples'] for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if 'loss' in r]
    assert samples == sorted(set(samples)), samples  # nothing logged (so trained) twice, nothing missing
    return samples


@pytest.fixture(scope='module')
def uninterrupted(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('full') / 'run'
    run(args_for(folder, out, **STAGE))
    return out


@pytest.fixture(scope='module')
def uninterrupted_2ranks(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('full2') / 'run'
    run2(args_for(folder, out, **STAGE))
    return out


def test_sigkill_after_a_checkpoint_then_the_same_command(folder, tmp_path, uninterrupted):
    out = tmp_path / 'run'
    args = args_for(folder, out, **STAGE)
    p = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL)
    wait_for(lambda: newest_samples(out) >= 32, p)
    p.kill()
    p.wait()
    killed_at = newest_samples(out)
    assert 32 <= killed_at < STAGE['samples'] and not os.path.exists(out / 'results.json')
    r = run(args)
    assert f'resumed {out} at {killed_at} samples' in r.stdout
    assert_same_weights(uninterrupted, out)
    assert logged_once(out) == logged_once(uninterrupted)
    assert len(checkpoint_files(str(out))) == 2  # keep_ckpts
    r = run(args)  # once more: the stage is complete, nothing retrained or overwritten
    assert 'is complete' in r.stdout
    res = [{k: v for k, v in json.load(open(d / 'results.json')).items() if not k.endswith('_s')}
           for d in (out, uninterrupted)]
    assert res[0] == res[1]  # the same accuracies as the uninterrupted run (wall times aside)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(folder, tmp_path, uninterrupted):
    out = tmp_path / 'run'
    args = args_for(folder, out, **STAGE)
    p = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL)
    wait_for(lambda: len(checkpoint_files(str(out))) == 2, p)
    p.kill()
    p.wait()
    newest, previous = checkpoint_files(str(out))
    with open(newest, 'r+b') as f:  # a copy cut short, a disk that lost the tail
        f.truncate(os.path.getsize(newest) // 2)
    previous_samples = read_checkpoint(previous)['samples_seen']
    r = run(args)
    assert 'is unreadable' in r.stderr and 'trying the previous one' in r.stderr
    assert f"resumed {out} at {previous_samples} samples" in r.stdout
    assert_same_weights(uninterrupted, out)


def test_a_full_disk_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    for s in (8, 16):
        checkpoint.save_checkpoint({'w': torch.full((4,), float(s))}, str(tmp_path), s)
    before = {f: open(f, 'rb').read() for f in checkpoint_files(str(tmp_path))}

    def full_disk(obj, f):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint.torch, 'save', full_disk)
    with pytest.raises(SystemExit) as e:
        checkpoint.save_checkpoint({'w': torch.zeros(4)}, str(tmp_path), 24)
    msg = str(e.value)
    assert 'disk full' in msg and 'intact' in msg and '\n' not in msg
    assert {f: open(f, 'rb').read() for f in checkpoint_files(str(tmp_path))} == before
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(f) for f in before)  # no temp file left
    assert read_checkpoint(str(tmp_path))['w'][0] == 16


def test_leftover_temp_file_is_removed_and_ignored(tmp_path):
    checkpoint.save_checkpoint({'w': torch.ones(2)}, str(tmp_path), 8)
    (tmp_path / '.ckpt-000000000016.pt.tmp').write_bytes(b'killed mid-save')
    assert read_checkpoint(str(tmp_path))['w'].sum() == 2
    checkpoint.remove_temp_files(str(tmp_path))
    assert os.listdir(tmp_path) == ['ckpt-000000000008.pt']


def test_another_stage_in_out_dir_is_refused_in_one_line(folder, tmp_path, uninterrupted):
    r = run(args_for(folder, uninterrupted, **{**STAGE, 'img_size': 32, 'eps': 4 / 255}), check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert 'another stage' in r.stderr and 'img_size 16 -> 32' in r.stderr and '--overwrite=True' in r.stderr
    r = run(args_for(folder, uninterrupted, **{**STAGE, 'num_workers': 1}), check=False)
    assert 'is complete' in r.stdout  # workers only change exactness: the same stage


def test_torchrun_restarts_both_ranks_after_one_is_killed(folder, tmp_path, uninterrupted_2ranks):
    out = tmp_path / 'run'
    p = subprocess.Popen(torchrun_cmd(args_for(folder, out, **STAGE), restarts=1), cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: newest_samples(out) >= 64, p)
    os.kill(worker_pids(p.pid)[-1], signal.SIGKILL)
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log[-3000:]
    assert 'resumed' in log
    assert_same_weights(uninterrupted_2ranks, out)
    logged_once(out)


def test_sigterm_to_a_two_rank_job_checkpoints_within_two_steps(folder, tmp_path, uninterrupted_2ranks):
    out = tmp_path / 'run'
    args = args_for(folder, out, **{**STAGE, 'ckpt_every': 0})
    p = subprocess.Popen(torchrun_cmd(args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    for line in p.stdout:
        if line.startswith('run 64/'):
            p.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
            break
    log = p.communicate(timeout=300)[0]
    line = next(l for l in log.splitlines() if l.startswith('SIGTERM at step'))
    got, saved = int(line.split()[3].rstrip(':')), int(line.split('at step ')[2].split()[0])
    assert 0 < saved - got <= 2, line
    assert read_checkpoint(str(out))['samples_seen'] == saved * STAGE['batch_size']
    assert 'resumed' in run2(args).stdout
    assert_same_weights(uninterrupted_2ranks, out)


@pytest.mark.slow
def test_web_stage_with_two_ranks_resumed_twice(tmp_path):
    import demo_data
    root = demo_data.ensure_demo(str(tmp_path / 'demo'), n_train=600, n_val=40, shard_size=100)
    args = ['config/demo_clip.py', f'--train_data={root}/shards/train-{{0000..0005}}.tar', f'--val_data={root}/val',
            '--batch_size=16', '--samples=640', '--log_every=64', '--ckpt_every=64', '--warmup_samples=64',
            '--eps_warmup=128', '--num_workers=2', '--shuffle_buffer=20', '--final_eval_samples=10',
            '--eval_every=0', '--eval_samples=10']
    run2(args + [f'--out_dir={tmp_path}/full'], timeout=900)
    out = tmp_path / 'cut'
    p = subprocess.Popen(torchrun_cmd(args + [f'--out_dir={out}'], restarts=2), cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for threshold in (128, 384):  # two faults, each after a later checkpoint
        wait_for(lambda: newest_samples(out) >= threshold, p, timeout=600)
        os.kill(worker_pids(p.pid)[0], signal.SIGKILL)
        time.sleep(1)
    log = p.communicate(timeout=900)[0]
    assert p.returncode == 0 and log.count('resumed') >= 2, log[-3000:]
    assert_same_weights(tmp_path / 'full', out)
