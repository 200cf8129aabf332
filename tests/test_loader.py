"""The input pipeline: multi-rank webdataset resume, SIGTERM-proof workers, the decode-only-
what-the-crop-needs training transform (timm's crop distribution, close to full decoding,
uint8), the MAE recipe's timm augmentation, labelled shards, exact ImageFolder resume."""
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from timm.data.auto_augment import RandAugment
from timm.data.mixup import Mixup
from timm.data.transforms import RandomResizedCropAndInterpolation

import augment
import configurator
import data
import decode
import make_shards
import webdata
from bench import child_pids
from test_clip_head import _write_shard as write_shard  # one tar writer for the tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAE_AA = 'rand-m9-mstd0.5-inc1'


# -------------------------------------------------------------------- fixtures
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





@pytest.fixture(scope='module')
def shards(tmp_path_factory):
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


# -------------------------------------------------------------------- exact multi-rank webdataset resume
def test_webdataset_resume_twice_with_two_ranks_is_exact(shards):
    """2 ranks x 2 workers, resumed twice through state_dict -> merge_states -> new loaders:
    the same batches (keys and image bytes) as an uninterrupted run. Each rank's state holds
    only the streams it owns, so another rank's stale copy of a stream never replaces the
    owner's fresh one and no stream re-reads data, from the second resume on too."""
    kw = dict(img_size=8, batch_size=2, world_size=2, seed=0, num_workers=2, shuffle_buffer=3)
    segments = (3, 3, 3)
    ref = {}
    for rank in range(2):
        it = iter(webdata.web_loader(shards, rank=rank, **kw))
        ref[rank] = [next(it) for _ in range(sum(segments))]
    state, got = None, {0: [], 1: []}
    for n in segments:
        states = []
        for rank in range(2):
            loader = webdata.web_loader(shards, rank=rank, state=state, **kw)
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


# -------------------------------------------------------------------- workers that ignore SIGTERM
def _sigterm_new_children(before, n, found):
    """SIGTERM each new child process the moment it appears, until n have been hit."""
    deadline = time.time() + 30
    while len(found) < n and time.time() < deadline:
        for pid in set(child_pids()) - before - set(found):
            os.kill(pid, signal.SIGTERM)
            found.append(pid)


def test_workers_ignore_sigterm(folder, shards):
    """SIGTERM to the workers (as a process-group kill sends it) must not stop the loader:
    the trainer handles SIGTERM by checkpointing, and needs its data to get there. Each worker
    gets it the moment it is forked, before it has run a line of Python, and again once a
    batch has come."""
    tf = decode.train_transform(16)
    loaders = [lambda: iter(data.image_folder_loader(folder, tf, 4, num_workers=2)),
               lambda: iter(webdata.web_loader(shards, 8, 2, num_workers=2, shuffle_buffer=2)),
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


def test_a_process_with_live_workers_still_exits(folder, shards):
    """Workers that ignore SIGTERM must not hang the exit: multiprocessing stops daemonic
    children at exit with SIGTERM and waits for them (data.py kills them first)."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import data, decode, webdata\n"
            f"a = iter(data.image_folder_loader({folder!r}, decode.train_transform(16), 4, num_workers=2)); next(a)\n"
            f"b = iter(webdata.web_loader({shards!r}, 8, 2, num_workers=2, shuffle_buffer=2)); next(b)\n"
            f"print('ok')\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == 'ok' and 'Error' not in r.stderr, r.stderr[-2000:]


# -------------------------------------------------------------------- the training transform (timm's crop, decoding)
def test_crop_is_timms_exactly():
    """With no DCT scaling (PNG) and no flip/RandAugment, load_train_image is timm's
    RandomResizedCropAndInterpolation pixel for pixel on the same seeds: the box drawn from
    the header has timm's distribution, the resize is the same resize. Also the fallback
    (a 60x20 strip) and a small crop scale."""
    for size, scale in (((500, 375), (0.08, 1.0)), ((375, 500), (0.08, 1.0)), ((60, 20), (0.9, 1.0)),
                        ((300, 200), (0.9, 1.0))):
        im = photo(1, size)
        buf = io.BytesIO()
        im.save(buf, 'PNG')
        for interp in ('bilinear', 'bicubic'):
            ref_tf = RandomResizedCropAndInterpolation(32, scale=scale, interpolation=interp)
            for seed in range(25):
                ours = decode.load_train_image(buf.getvalue(), seed, 32, scale=scale, hflip=0.0, interpolation=interp)
                decode.seed_sample(seed)
                ref = torch.from_numpy(np.asarray(ref_tf(im)).transpose(2, 0, 1).copy())
                assert torch.equal(ours, ref), (size, seed)
    # the boxes themselves: drawn from the header only (the file is not decoded) = drawn from the pixels
    pixels = photo(2)
    jpg = Image.open(io.BytesIO(jpeg_bytes(pixels)))
    for seed in range(200):
        random.seed(seed)
        a = RandomResizedCropAndInterpolation.get_params(jpg, (0.08, 1.0), (3 / 4, 4 / 3))
        random.seed(seed)
        b = RandomResizedCropAndInterpolation.get_params(pixels, (0.08, 1.0), (3 / 4, 4 / 3))
        assert a == b
    assert jpg._im is None  # still only the header: nothing was decoded


def test_draft_decoding_is_close_to_full_decoding():
    """DCT-scaled decoding (1/2, 1/4, 1/8) then the resize, against full decoding then the same
    crop and resize: mean abs difference under 2/255 over many crops, and under what choosing
    bicubic instead of bilinear changes; most crops are drafted."""
    scales, diffs, interp_diffs = [], [], []
    to_t = lambda im: torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()).float()
    for i in range(4):
        b = jpeg_bytes(photo(10 + i, (640, 480) if i % 2 else (480, 640)))
        full = Image.open(io.BytesIO(b)).convert('RGB')
        for seed in range(30):
            for S in (56, 112):
                fast = decode.load_train_image(b, seed, S, hflip=0.0).float()
                decode.seed_sample(seed)
                top, left, h, w = RandomResizedCropAndInterpolation.get_params(full, (0.08, 1.0), (3 / 4, 4 / 3))
                crop = full.crop((left, top, left + w, top + h))
                ref = to_t(crop.resize((S, S), Image.BILINEAR))
                diffs.append((fast - ref).abs().mean().item())
                interp_diffs.append((to_t(crop.resize((S, S), Image.BICUBIC)) - ref).abs().mean().item())
                scales.append(decode.draft_scale(w, h, S))
    scales, diffs = np.array(scales), np.array(diffs)
    assert diffs[scales == 1].max() == 0  # not drafted: timm's crop exactly
    assert diffs.mean() < 2.0 and diffs.mean() < np.mean(interp_diffs) and diffs.max() < 6.0, \
        (diffs.mean(), np.mean(interp_diffs), diffs.max())
    assert np.mean(scales > 1) > 0.5 and scales.max() >= 4


def test_decoding_stops_at_the_crops_bottom_row():
    """load_rows makes libjpeg stop at the crop's last row: the rows below stay undecoded (zero),
    the rows above are the full decode's. The training transform's output is bitwise the one
    from decoding the whole file (a trailing byte after the end marker forces that), on 4:2:0
    colour, grayscale, progressive and CMYK JPEGs, drafted or not. A file cut short is decoded
    whole, so it fails on every crop, also on crops that lie above the cut."""
    b = jpeg_bytes(photo(20))
    full = np.asarray(Image.open(io.BytesIO(b)).convert('RGB'))
    im = Image.open(io.BytesIO(b))
    decode.load_rows(im, 100)
    part = np.asarray(im)
    assert np.array_equal(part[:100], full[:100]) and part[100:].max() == 0 and full[100:].min(axis=1).max() > 0
    im = Image.open(io.BytesIO(b))
    im.draft('RGB', (125, 93))  # 1/4 scale, as load_train_image asks for it
    decode.load_rows(im, 30)
    assert im.size == (125, 94) and np.asarray(im)[:30].min(axis=1).max() > 0 and np.asarray(im)[30:].max() == 0
    progressive, cmyk = io.BytesIO(), io.BytesIO()
    photo(22).save(progressive, 'JPEG', quality=90, progressive=True)
    photo(23).convert('CMYK').save(cmyk, 'JPEG', quality=90)  # some ImageNet files are CMYK
    gray = jpeg_bytes(photo(21, (375, 500)).convert('L'))
    stopped = []
    for src in (b, gray, progressive.getvalue(), cmyk.getvalue()):
        for S in (32, 112):
            for seed in range(20):
                x = decode.load_train_image(src, seed, S, auto_augment=MAE_AA)
                assert torch.equal(x, decode.load_train_image(src + b'\0', seed, S, auto_augment=MAE_AA)), (S, seed)
                decode.seed_sample(seed)
                top, _, h, _ = RandomResizedCropAndInterpolation.get_params(Image.open(io.BytesIO(src)), (0.08, 1.0),
                                                                           (3 / 4, 4 / 3))
                stopped.append(top + h < Image.open(io.BytesIO(src)).height)
    assert np.mean(stopped) > 0.8  # most crops end above the last row: the stop is exercised
    cut = b[:len(b) * 2 // 3]
    for seed in range(20):
        with pytest.raises(OSError, match='truncated'):
            decode.load_train_image(cut, seed, 32)


def test_train_transform_uint8_and_mae_augmentation():
    b = jpeg_bytes(photo(3))
    tf = decode.train_transform(48, auto_augment=MAE_AA)
    x = tf(b, 7)
    assert x.dtype == torch.uint8 and x.shape == (3, 48, 48)
    assert torch.equal(x, tf(b, 7)) and not torch.equal(x, tf(b, 8))  # a function of the seed alone
    ra = decode._rand_augment(MAE_AA, 48, 'bilinear')  # timm's RandAugment, MAE's string
    assert isinstance(ra, RandAugment) and ra.num_layers == 2
    names = [op.name for op in ra.ops]
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    assert 'PosterizeIncreasing' in names and 'SolarizeIncreasing' in names and len(names) == 15  # inc1
    # the magnitude-10 posterize (0 bits: black) that Pillow 13 refuses works, as in timm
    post = next(op for op in ra.ops if op.name == 'PosterizeIncreasing')
    post.prob, post.magnitude, post.magnitude_std = 1.0, 10, 0
    try:
        assert np.asarray(post(Image.new('RGB', (8, 8), (200, 100, 50)))).max() == 0
    finally:
        post.prob, post.magnitude, post.magnitude_std = 0.5, 9, 0.5


def test_configs_follow_their_recipes():
    """Each paper config's augmentation is its cited recipe's, value by value (MAE Table 11 for
    ImageNet pre-training, MAE fine-tuning (Table 9 / main_finetune.py) for config/advxl_ft_in1k.py)."""
    def load(name):
        return configurator.read_config(os.path.join(ROOT, 'config', f'{name}.py'))
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'config')) if f.startswith('advxl_'))
    seen = set()
    for name in names:
        c = load(name)
        if c['data'] == 'webdataset':  # CLIPA's recipe: no RandAugment, MixUp, CutMix or erasing
            assert c['auto_augment'] == '' and c['mixup'] == c['cutmix'] == c['reprob'] == 0.0, name
            seen.add('web')
            continue
        assert c['auto_augment'] == MAE_AA and c['mixup'] == 0.8 and c['cutmix'] == 1.0, name
        assert c['label_smoothing'] == 0.1 and tuple(c['crop_scale']) == (0.08, 1.0) and c.get('hflip', True), name
        assert c['reprob'] == (0.25 if '_ft' in name else 0.0), name  # MAE fine-tuning / Table 11
        assert c['val_crop_pct'] == 0.9 and c['val_interpolation'] == 'bicubic', name  # the official evaluation
        assert c['train_interpolation'] == 'bilinear' and c['num_workers'] >= 1, name  # the paper's resize
        seen.add('ft' if '_ft' in name else 'pre')
    assert seen == {'web', 'ft', 'pre'}


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


def test_webdataset_uint8_and_mae_augmentation(shards):
    loader = webdata.web_loader(shards, 16, 4, num_workers=0, shuffle_buffer=4, uint8=True, labelled=True,
                                auto_augment=MAE_AA, scale=(0.08, 1.0))
    b = next(iter(loader))
    assert b.image.dtype == torch.uint8 and b.image.shape == (4, 3, 16, 16)
    assert b.label.tolist() == [int(k[:2]) for k in b.key]  # labels from .cls
    x = augment.to_device(b.image, 'cpu')
    assert x.dtype == torch.float32 and torch.equal(x, b.image.float() / 255)


# -------------------------------------------------------------------- on the device: Mixup/CutMix, RandomErasing
def test_mix_batch_is_timms_mixup_seeded():
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    soft = augment.soft_targets(y, 8, 0.1)
    np.random.seed(123)
    before = np.random.rand()
    np.random.seed(123)
    xm, t = augment.mix_batch(x.clone(), soft, 0.8, 1.0, seed=5)
    assert np.random.rand() == before  # the caller's global RNG state is untouched
    xm2, t2 = augment.mix_batch(x.clone(), soft, 0.8, 1.0, seed=5)
    assert torch.equal(xm, xm2) and torch.equal(t, t2)
    decode.seed_sample(5)  # = timm's Mixup on hard labels with its own label smoothing, numpy seeded alike
    xr, tr = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=8)(x.clone(), y)
    assert torch.equal(xm, xr) and torch.allclose(t, tr, atol=1e-7)
    assert torch.allclose(t.sum(1), torch.ones(8)) and t.min() > 0  # smoothed probabilities
    kinds, hard = set(), augment.soft_targets(y, 8)
    for seed in range(20):  # both kinds happen, and each keeps the label mass where the pixels are
        xm, t = augment.mix_batch(x.clone(), hard, 0.8, 1.0, seed=seed)
        lam = t[y, y]
        if ((xm == x).float().mean() > 0.2).item():  # cutmix: the pasted area is the partner's share
            kinds.add('cutmix')
            torch.testing.assert_close((xm == x).float().mean((1, 2, 3)), lam)
        else:
            kinds.add('mixup')
            torch.testing.assert_close(xm, lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x.flip(0))
    assert kinds == {'mixup', 'cutmix'}
    assert augment.mix_batch(x, soft, 0.0, 0.0)[1] is soft and soft.max() == pytest.approx(0.9125)


def test_random_erase_seeded_and_in_range():
    x = torch.rand(16, 3, 32, 32)
    a, b = augment.random_erase(x, 0.25, seed=1), augment.random_erase(x, 0.25, seed=1)
    assert torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    changed = (a - x).abs().flatten(1).max(1).values > 1e-5
    assert 0 < changed.sum() < 16  # some erased (p = 0.25), not all
    assert torch.equal(augment.random_erase(x, 0.0), x)


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
