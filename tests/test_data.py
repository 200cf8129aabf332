import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import augment
import data
import demo_data
import webdata

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


def test_soft_targets_are_timms_smoothed_one_hot():
    t = augment.soft_targets(torch.arange(8) % 5, 5, smoothing=0.1)
    assert torch.allclose(t.sum(1), torch.ones(8)) and t.max() == pytest.approx(0.92)
    assert torch.equal(t.argmax(1), torch.arange(8) % 5)
    # (MixUp / CutMix: tests/test_loader.py, test_mix_batch_is_timms_mixup_seeded)


@pytest.mark.slow
def test_demo_reaches_the_target(tmp_path):
    """The README's demo, both stages (about 10 minutes on 2 cores): clean >= 70%, PGD-20 >= 35%."""
    env = {**os.environ}
    for args in ([f'--out_dir={tmp_path}/pre'], ['config/demo_ft.py', f'--init_from={tmp_path}/pre', f'--out_dir={tmp_path}/ft']):
        subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, check=True, env=env, timeout=1200)
    res = json.load(open(tmp_path / 'ft' / 'results.json'))
    assert res['clean_acc'] >= 70 and res['pgd20_acc'] >= 35 and res['eps'] == pytest.approx(8 / 255)
