"""Tests of webdata.py, the webdataset input: the tar reader against Python's tarfile (pax, GNU,
ustar, gzip, damaged headers), streams that split shards disjointly across ranks and workers,
exact resume through state_dict (also twice, over two ranks, with merge_states preferring each
stream's owner), bad samples and shards skipped and counted, uint8 batches with MAE's
augmentation and labels from .cls; and make_shards.py, which writes the labelled shards the
loader reads back."""
import gzip
import io
import json
import os
import random
import tarfile
import time

import pytest
import torch
from PIL import Image

import augment
import make_shards
import webdata
from conftest import MAE_AA, N_SHARDS, PER_SHARD


# -------------------------------------------------------------------- streams: disjoint shards, resume, bad data
def test_streams_see_disjoint_shards_within_a_pass(shards):
    # 2 ranks x 2 workers, batch = one shard, no shuffle: each batch is one whole shard
    seen = []
    for rank in range(2):
        loader = webdata.web_loader(str(shards / '{00000..00007}.tar'), 16, PER_SHARD, rank=rank, world_size=2,
                                    num_workers=2, shuffle_buffer=1, seed=3)
        it = iter(loader)
        for _ in range(N_SHARDS // 2):  # one pass: 8 shards over 4 streams
            batch = next(it)
            shard_ids = {k[:3] for k in batch.key}
            assert len(shard_ids) == 1 and len(batch.key) == PER_SHARD
            seen.append(shard_ids.pop())
            assert batch.image.shape == (PER_SHARD, 3, 16, 16) and batch.image.dtype == torch.float32
            assert 0 <= batch.image.min() and batch.image.max() <= 1
            assert batch.text[0].startswith('caption') and batch.label is not None
        assert loader.samples == N_SHARDS // 2 * PER_SHARD
    assert sorted(seen) == [f'{s:03d}' for s in range(N_SHARDS)]  # every shard once, none twice
    # the shard order: each pass a permutation, also with fewer shards than streams
    for n, G in ((8, 4), (3, 4)):
        for p in range(3):
            assert sorted(webdata.shard_index(p * n + i, n, 0) for i in range(n)) == list(range(n))


def test_resume_is_exact(shards):
    kw = dict(pattern=str(shards / '{00000..00007}.tar'), img_size=16, batch_size=3, num_workers=2,
              shuffle_buffer=6, seed=1)
    ref = []
    for i, b in enumerate(webdata.web_loader(**kw)):
        ref.append(b)
        if i == 7:
            break
    first = webdata.web_loader(**kw)
    for i, b in enumerate(first):
        assert b.key == ref[i].key
        if i == 2:
            break
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    resumed = webdata.web_loader(**kw, state=state)
    for i, b in enumerate(resumed, start=3):
        assert b.key == ref[i].key
        assert torch.equal(b.image, ref[i].image)  # same crops and flips too
        if i == 7:
            break
    assert resumed.samples == 8 * 3 and resumed.batches == 8
    assert any(len({k[:3] for k in b.key}) > 1 for b in ref)  # the buffer mixes shards


def test_bad_samples_and_shards_are_skipped_and_counted(shards, capsys):
    loader = webdata.web_loader(str(shards / 'bad' / '{a,b,c}.tar'), 16, 1, num_workers=0, shuffle_buffer=1)
    keys, skipped = [], {k: 0 for k in webdata.SKIP_KINDS}
    for i, b in enumerate(loader):
        keys.append(b.key[0])
        skipped = {k: skipped[k] + loader.skipped_last[k] for k in skipped}
        if i == 9:
            break
    good = {f'100{i:04d}' for i in range(4)} | {f'101{i:04d}' for i in range(3)} | {f'102{i:04d}' for i in range(2)}
    assert set(keys[:9]) == good  # one pass: every readable sample once
    assert loader.skipped == {'bad_samples': 1, 'bad_shards': 1} == skipped
    assert 'c.tar' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        webdata.expand_shards(str(shards / 'bad' / '{a,b,c,d}.tar'))
    assert 'd.tar' in str(e.value) and '\n' not in str(e.value)


# -------------------------------------------------------------------- exact multi-rank webdataset resume
def test_webdataset_resume_twice_with_two_ranks_is_exact(shard_pattern):
    """2 ranks x 2 workers, resumed twice through state_dict -> merge_states -> new loaders:
    the same batches (keys and image bytes) as an uninterrupted run. Each rank's state holds
    only the streams it owns, so another rank's stale copy of a stream never replaces the
    owner's fresh one and no stream re-reads data, from the second resume on too."""
    kw = dict(img_size=8, batch_size=2, world_size=2, seed=0, num_workers=2, shuffle_buffer=3)
    segments = (3, 3, 3)
    ref = {}
    for rank in range(2):
        it = iter(webdata.web_loader(shard_pattern, rank=rank, **kw))
        ref[rank] = [next(it) for _ in range(sum(segments))]
    state, got = None, {0: [], 1: []}
    for n in segments:
        states = []
        for rank in range(2):
            loader = webdata.web_loader(shard_pattern, rank=rank, state=state, **kw)
            it = iter(loader)
            got[rank] += [next(it) for _ in range(n)]
            del it
            states.append(loader.state_dict())
            assert all(int(g) // 2 == rank for g in states[-1]['streams'])  # only its own streams
        state = webdata.merge_states(states[::-1] if len(got[0]) == 6 else states)  # order must not matter
    for rank in range(2):
        for a, b in zip(ref[rank], got[rank]):
            assert a.key == b.key and torch.equal(a.image, b.image)


def test_merge_states_prefers_the_owner():
    layout = {'num_workers': 2}
    stale = {'layout': layout, 'base': 0, 'ranks': {1: {}}, 'streams': {0: 'stale', 1: 'stale', 2: 'fresh2', 3: 'fresh3'}}
    owner = {'layout': layout, 'base': 0, 'ranks': {'0': {}}, 'streams': {'0': 'fresh0', '1': 'fresh1'}}
    for states in ([owner, stale], [stale, owner]):
        assert webdata.merge_states(states)['streams'] == {0: 'fresh0', 1: 'fresh1', 2: 'fresh2', 3: 'fresh3'}


# -------------------------------------------------------------------- uint8 batches, MAE augmentation, labels
def test_webdataset_uint8_and_mae_augmentation(shard_pattern):
    loader = webdata.web_loader(shard_pattern, 16, 4, num_workers=0, shuffle_buffer=4, uint8=True, labelled=True,
                                auto_augment=MAE_AA, scale=(0.08, 1.0))
    b = next(iter(loader))
    assert b.image.dtype == torch.uint8 and b.image.shape == (4, 3, 16, 16)
    assert b.label.tolist() == [int(k[:2]) for k in b.key]  # labels from .cls
    x = augment.to_device(b.image, 'cpu')
    assert x.dtype == torch.float32 and torch.equal(x, b.image.float() / 255)


# -------------------------------------------------------------------- labelled shards and the tar reader
def test_make_shards_resumes_counts_bad_files_and_reads_back(folder, tmp_path):
    dst = tmp_path / 'shards'
    args = [folder, str(dst), '--shard_size', '7', '--max_side', '100', '--workers', '2']
    m = make_shards.main(args)
    assert m['classes'] == ['class0', 'class1', 'class2'] and m['n_images'] == 24 and m['n_unreadable'] == 1
    assert 'broken.jpg' in m['unreadable'][0] and [s['n'] for s in m['shards']] in ([7, 7, 6, 4], [7, 6, 7, 4],
                                                                                   [6, 7, 7, 4], [7, 7, 7, 3])
    assert json.load(open(dst / 'manifest.json')) == m
    # an interrupted run: one shard missing, another half-written; the rerun redoes only those
    names = sorted(p for p in os.listdir(dst) if p.endswith('.tar'))
    os.remove(dst / names[1])
    (dst / names[2]).rename(dst / (names[2] + '.tmp'))
    mtime0 = os.path.getmtime(dst / names[0])
    time.sleep(0.01)
    assert make_shards.main(args) == m
    assert os.path.getmtime(dst / names[0]) == mtime0 and not any(p.endswith('.tmp') for p in os.listdir(dst))
    with pytest.raises(SystemExit):  # another conversion into the same folder is refused
        make_shards.main(args[:3] + ['8'])
    # read back through the labelled-shard loader: every image once, with its class
    loader = webdata.web_loader(m['pattern'], 20, 4, num_workers=0, shuffle_buffer=1, labelled=True, uint8=True,
                                train=False)
    it = iter(loader)
    batches = [next(it) for _ in range(6)]
    labels = torch.cat([b.label for b in batches])
    assert len(set(k for b in batches for k in b.key)) == 24 and sorted(labels.tolist()) == [0] * 8 + [1] * 8 + [2] * 8
    for b in batches:  # channel c saturated in class c's images (resized: nearly)
        x = b.image.float()
        assert torch.equal(x.mean((2, 3)).argmax(1), b.label)
    assert max(max(Image.open(io.BytesIO(s)).size) for s in _jpgs(dst)) <= 100
    assert loader.skipped == {'bad_samples': 0, 'bad_shards': 0}


def _jpgs(dst):
    for name in os.listdir(dst):
        if name.endswith('.tar'):
            with tarfile.open(dst / name) as tar:
                for info in tar:
                    if info.name.endswith('.jpg'):
                        yield tar.extractfile(info).read()


@pytest.mark.parametrize('fmt', [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    # long names (GNU 'L' / pax 'path' / ustar prefix), non-ASCII names, a directory, empty
    # and odd-sized members, gzip by name and by content; then a damaged header
    rng = random.Random(fmt)
    names = ['d/000001.jpg', 'd/000001.cls', 'e' * 150 + '/k2.jpg', 'k2.txt', 'e' * 98 + '.j']  # 100 chars: no NUL
    names += [] if fmt == tarfile.USTAR_FORMAT else ['ünï/cödé.jpg', 'p' * 120 + '.txt']
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w', format=fmt) as tar:
        for n in names:
            d = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 511, 512, 513, 3000])))
            ti = tarfile.TarInfo(n)
            ti.size = len(d)
            tar.addfile(ti, io.BytesIO(d))
        ti = tarfile.TarInfo('adir')
        ti.type = tarfile.DIRTYPE
        tar.addfile(ti)
    for name, raw in (('a.tar', buf.getvalue()), ('b.tar.gz', gzip.compress(buf.getvalue())),
                      ('c.tar', gzip.compress(buf.getvalue()))):
        (tmp_path / name).write_bytes(raw)
        with tarfile.open(tmp_path / name) as tar:
            want = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
        f, stream = webdata._open_tar(str(tmp_path / name))
        got = [(n, read()) for n, read in webdata.tar_members(f)]
        stream.close()
        assert got == want and len(got) == len(names)
        f, stream = webdata._open_tar(str(tmp_path / name))  # members not read are skipped
        assert [n for i, (n, read) in enumerate(webdata.tar_members(f)) if i % 2 or read() is not None] == [n for n, _ in want]
        stream.close()
    bad = bytearray(buf.getvalue())
    bad[1024 if fmt == tarfile.USTAR_FORMAT else 0] ^= 0x20  # a flipped bit in a header
    with pytest.raises(ValueError, match='checksum'):
        list(webdata.tar_members(io.BytesIO(bytes(bad))))
    with pytest.raises(EOFError):  # cut inside a member
        [read() for _, read in webdata.tar_members(io.BytesIO(buf.getvalue()[:1536 + 100]))]
