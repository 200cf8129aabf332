"""Tests of decode.py, the training transform that decodes only what the crop needs: the crop
box is timm's RandomResizedCropAndInterpolation pixel for pixel and is drawn from the JPEG header
alone, DCT-scaled (draft) decoding stays close to full decoding, decoding stops at the crop's
bottom row without changing the output, and train_transform gives uint8 images, a function of
the sample seed, with MAE's timm RandAugment."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation

import decode
from conftest import MAE_AA, jpeg_bytes, photo


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
