"""Tests of data.py and demo_data.py: SampleStream splits global batches across ranks and
resumes exactly, the ImageFolder loader gives uint8 batches, resumes bitwise and counts unreadable
files, data workers survive SIGTERM and still let the process exit, and the demo generator makes a
deterministic, balanced, captioned split cached as an ImageFolder and readable shards, whole
even when two processes build it at once. The slow
test trains the README's demo end to end through train.py and checks its target accuracies."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import data
import decode
import demo_data
import webdata
from bench import child_pids
from conftest import MAE_AA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_split_is_deterministic_balanced_and_captioned():
    a, ya, ca = demo_data.make_split(60, seed=3)
    b, yb, cb = demo_data.make_split(60, seed=3)
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and ca == cb
    assert not np.array_equal(a, demo_data.make_split(60, seed=4)[0])
    assert np.bincount(ya, minlength=10).tolist() == [6] * 10
    assert a.shape == (60, 32, 32, 3) and a.dtype == np.uint8
    for y, c in zip(ya, ca):  # the caption names the class that was drawn, first and in the phrase
        assert c.startswith(f'{demo_data.DEMO_CLASSES[y]}: a ') and f' {demo_data.DEMO_CLASSES[y]} on ' in c


def test_demo_cache_has_imagefolder_and_readable_shards(tmp_path):
    root = demo_data.ensure_demo(str(tmp_path / 'demo'), n_train=40, n_val=20, shard_size=16)
    assert sorted(os.listdir(os.path.join(root, 'train'))) == sorted(demo_data.DEMO_CLASSES)
    assert sum(len(f) for _, _, f in os.walk(os.path.join(root, 'val'))) == 20
    loader = webdata.web_loader(os.path.join(root, 'shards', 'train-{0000..0002}.tar'), 16, 8, num_workers=0,
                                shuffle_buffer=4)
    batch = next(iter(loader))
    assert batch.image.shape == (8, 3, 16, 16) and 0 <= batch.image.min() and batch.image.max() <= 1
    for y, text in zip(batch.label.tolist(), batch.text):
        assert demo_data.DEMO_CLASSES[y] in text
    # label order = sorted folder names, also where the demo's is known without reading the disk
    classes = data.ImageFolderSafe(os.path.join(root, 'val'), None).classes
    assert data.class_names(os.path.join(root, 'val')) == classes == sorted(demo_data.DEMO_CLASSES)
    assert data.class_names(os.path.join(demo_data.DEMO_ROOT, 'val')) == classes != demo_data.DEMO_CLASSES
    mtime = os.path.getmtime(os.path.join(root, 'DONE'))
    demo_data.ensure_demo(str(tmp_path / 'demo'), n_train=40, n_val=20, shard_size=16)  # cached: not rebuilt
    assert os.path.getmtime(os.path.join(root, 'DONE')) == mtime


def test_demo_cache_built_by_two_processes_at_once(tmp_path):
    """Two runs started together on a fresh clone both build the cache: the one left is whole."""
    root = str(tmp_path / 'demo')
    code = f"import demo_data; demo_data.ensure_demo({root!r}, n_train=300, n_val=100, shard_size=100)"
    procs = [subprocess.Popen([sys.executable, '-c', code], cwd=ROOT) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    count = lambda split: sum(len(f) for _, _, f in os.walk(os.path.join(root, split)))
    assert (count('train'), count('val')) == (300, 100)
    assert sorted(os.listdir(os.path.join(root, 'shards'))) == [f'{s}-{i:04d}.tar' for s, n in (('train', 3), ('val', 1))
                                                             for i in range(n)]
    assert os.listdir(tmp_path) == ['demo']  # no build folder left behind


def test_sample_stream_shards_global_batches_across_ranks():
    n, bs = 50, 4
    one = iter(data.SampleStream(n, 2 * bs, seed=1))
    r0, r1 = iter(data.SampleStream(n, bs, 0, 2, seed=1)), iter(data.SampleStream(n, bs, 1, 2, seed=1))
    for _ in range(20):  # 20 global batches = more than 3 passes
        single = [next(one) for _ in range(2 * bs)]
        split = [next(r0) for _ in range(bs)] + [next(r1) for _ in range(bs)]
        assert single == split  # same indices and the same augmentation seeds
    seen = [next(iter(data.SampleStream(n, bs, seed=1)))[0]]
    stream = iter(data.SampleStream(n, bs, seed=1))
    first_pass = [next(stream)[0] for _ in range(48)]
    assert len(set(first_pass)) == 48  # one pass: no repeats (the ragged tail of 2 is dropped)
    resumed = iter(data.SampleStream(n, bs, seed=1, start=30))
    full = iter(data.SampleStream(n, bs, seed=1))
    assert [next(full) for _ in range(70)][30:] == [next(resumed) for _ in range(40)]
    assert seen[0] == first_pass[0]


# -------------------------------------------------------------------- loaders: uint8, exact resume
def test_image_folder_loader_uint8_and_exact_resume(folder):
    """uint8 batches; a loader restarted at a sample position gives the same batches bitwise
    (timm's RandAugment and the crops are seeded per sample); the unreadable file is counted."""
    tf = decode.train_transform(24, auto_augment=MAE_AA)
    it = iter(data.image_folder_loader(folder, tf, 4, seed=3, num_workers=2))
    ref = [next(it) for _ in range(8)]  # 8 x 4 = 32 > 25 files: a pass and a bit
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 24, 24) for x, _, _ in ref)
    assert all(len(x) + n == 4 for x, _, n in ref) and sum(n for _, _, n in ref[:6]) <= 1  # broken: counted
    resumed = iter(data.image_folder_loader(folder, tf, 4, seed=3, start=5 * 4, num_workers=1))
    for i in range(5, 8):
        x, y, n = next(resumed)
        assert torch.equal(x, ref[i][0]) and torch.equal(y, ref[i][1]) and n == ref[i][2]


# -------------------------------------------------------------------- workers that ignore SIGTERM
def _sigterm_new_children(before, n, found):
    """SIGTERM each new child process the moment it appears, until n have been hit."""
    deadline = time.time() + 30
    while len(found) < n and time.time() < deadline:
        for pid in set(child_pids()) - before - set(found):
            os.kill(pid, signal.SIGTERM)
            found.append(pid)


def test_workers_ignore_sigterm(folder, shard_pattern):
    """SIGTERM to the workers (as a process-group kill sends it) must not stop the loader:
    the trainer handles SIGTERM by checkpointing, and needs its data to get there. Each worker
    gets it the moment it is forked, before it has run a line of Python, and again once a
    batch has come."""
    tf = decode.train_transform(16)
    loaders = [lambda: iter(data.image_folder_loader(folder, tf, 4, num_workers=2)),
               lambda: iter(webdata.web_loader(shard_pattern, 8, 2, num_workers=2, shuffle_buffer=2)),
               lambda: iter(data.val_loader(folder, data.val_transform(16), 2, num_workers=2))]
    for make in loaders:
        workers = []
        killer = threading.Thread(target=_sigterm_new_children, args=(set(child_pids()), 2, workers))
        killer.start()
        it = make()
        next(it)
        killer.join()
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        for _ in range(3):
            next(it)
        assert all(os.path.exists(f'/proc/{pid}') for pid in workers)
        del it


def test_a_process_with_live_workers_still_exits(folder, shard_pattern):
    """Workers that ignore SIGTERM must not hang the exit: multiprocessing stops daemonic
    children at exit with SIGTERM and waits for them (data.py kills them first)."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import data, decode, webdata\n"
            f"a = iter(data.image_folder_loader({folder!r}, decode.train_transform(16), 4, num_workers=2)); next(a)\n"
            f"b = iter(webdata.web_loader({shard_pattern!r}, 8, 2, num_workers=2, shuffle_buffer=2)); next(b)\n"
            f"print('ok')\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == 'ok' and 'Error' not in r.stderr, r.stderr[-2000:]


# -------------------------------------------------------------------- the demo, end to end
@pytest.mark.slow
def test_demo_reaches_the_target(tmp_path):
    """The README's demo, both stages (about 5 minutes on 2 cores): clean >= 78%, PGD-20 >= 50% on 500 val images."""
    env = {**os.environ}
    for args in ([f'--out_dir={tmp_path}/pre'], ['config/demo_ft.py', f'--init_from={tmp_path}/pre', f'--out_dir={tmp_path}/ft']):
        subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, check=True, env=env, timeout=1200)
    res = json.load(open(tmp_path / 'ft' / 'results.json'))
    assert res['clean_acc'] >= 78 and res['pgd20_acc'] >= 50 and res['eps'] == pytest.approx(8 / 255)
    assert res['eval_images'] == 500
