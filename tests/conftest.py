"""Shared test setup: the repository on sys.path, two torch threads, and the image and shard
fixtures that several test files use (photo-like JPEGs, an ImageFolder with an unreadable file,
and two sets of webdataset tar shards)."""
import io
import os
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

MAE_AA = 'rand-m9-mstd0.5-inc1'  # MAE's RandAugment string
N_SHARDS, PER_SHARD = 8, 4  # the `shards` fixture's layout


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models on a shared 2-core machine: one thread beats two, up to 20x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -------------------------------------------------------------------- images and tar shards
def photo(seed, size=(500, 375)):
    """A smooth, photo-like test image (blurred noise plus gradients): JPEG-compressible like a
    photograph, unlike raw noise, so DCT-scaled decoding is judged fairly."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1.5))
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.asarray(im, np.float32) * 0.7 + 0.3 * 255 * (xx / w)[..., None]
    arr += rng.normal(0, 4, arr.shape)  # sensor noise: some high frequencies
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def jpeg_bytes(im, quality=90):
    buf = io.BytesIO()
    im.save(buf, 'JPEG', quality=quality)
    return buf.getvalue()


def _jpg(seed, size=(20, 16)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, 'JPEG')
    return buf.getvalue()


def write_shard(path, samples):
    with tarfile.open(path, 'w') as tar:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f'{key}.{ext}')
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


def _sample(s, i):
    return f'{s:03d}{i:04d}', {'jpg': _jpg(s * 100 + i), 'txt': f'caption {s} {i}'.encode(), 'cls': str(s).encode()}


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    """A folder of N_SHARDS tar shards x PER_SHARD samples (noise JPEG, caption, class; keys
    'SSSIIII'), and under bad/ three shards with an undecodable image and a truncated file."""
    root = tmp_path_factory.mktemp('shards')
    for s in range(N_SHARDS):
        write_shard(root / f'{s:05d}.tar', [_sample(s, i) for i in range(PER_SHARD)])
    # bad set: a = 4 good; b = 3 good + an undecodable jpg; c = truncated inside its 3rd sample
    bad = root / 'bad'
    bad.mkdir()
    write_shard(bad / 'a.tar', [_sample(100, i) for i in range(4)])
    b = [_sample(101, i) for i in range(4)]
    b[3][1]['jpg'] = b'\xff\xd8\xff not a jpeg'
    write_shard(bad / 'b.tar', b)
    write_shard(bad / 'c.tar', [_sample(102, i) for i in range(4)])
    with tarfile.open(bad / 'c.tar') as t:
        cut = next(m for m in t.getmembers() if m.name == '1020002.jpg').offset_data + 10
    data = (bad / 'c.tar').read_bytes()
    (bad / 'c.tar').write_bytes(data[:cut])
    return root


@pytest.fixture(scope='module')
def shard_pattern(tmp_path_factory):
    """8 tar shards x 6 photo-like samples (JPEG, caption, class; keys 'SSII'), as a brace pattern."""
    root = tmp_path_factory.mktemp('wds')
    for s in range(8):
        write_shard(root / f'{s:03d}.tar', [(f'{s:02d}{i:02d}', {
            'jpg': jpeg_bytes(photo(s * 100 + i, (24, 20))), 'txt': f'caption {s} {i}'.encode(),
            'cls': str(s).encode()}) for i in range(6)])
    return str(root / '{000..007}.tar')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """An ImageFolder of 3 classes x 8 photo-like JPEGs (class c has a c-dependent tint), one unreadable."""
    root = tmp_path_factory.mktemp('folder')
    for c in range(3):
        os.makedirs(root / f'class{c}')
        for i in range(8):
            im = photo(c * 10 + i, (120, 90) if i % 2 else (90, 120))
            arr = np.asarray(im).copy()
            arr[..., c] = 255  # the label is visible: channel c saturated
            Image.fromarray(arr).save(root / f'class{c}' / f'{i}.jpg', quality=90)
    (root / 'class1' / 'broken.jpg').write_bytes(b'\xff\xd8\xff not a jpeg')
    return str(root)
