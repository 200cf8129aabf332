"""
The training transform: an encoded image (file or bytes) to a uint8 (3, S, S) tensor, the
MAE recipe's augmentation from timm (RandomResizedCrop's distribution, flip, RandAugment),
with the crop decoded cheaply (load_train_image: DCT-scaled JPEG decoding of only the rows
the crop needs). Used by the ImageFolder loader (train_transform) and the shard stream.
"""
import functools
import io
import math
import random

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import posterize as timm_posterize, rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from model import IMAGENET_MEAN

RESAMPLE = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}


# One function from an encoded image to a uint8 (3, S, S) tensor, the MAE recipe's augmentation
# (timm's create_transform: RandomResizedCropAndInterpolation, flip, RandAugment) done cheaply:
# - the crop box is drawn from the header's size (Image.open reads only the header), with timm's
#   own get_params, so the box distribution is timm's exactly (tested on fixed seeds);
# - the JPEG is decoded with DCT scaling (Image.draft) at the largest 1/2^k that keeps the box at
#   least S px on each side, and only down to the box's last row (load_rows);
# - the box, mapped into the reduced image, is resized to S x S in one anti-aliased PIL resize;
# - flip, then timm's RandAugment on the small image (timm's order), then uint8 out: workers
#   hand 1/4 of float32's bytes to shared memory and pinning, to_device() makes floats on the GPU.
# Randomness: python's `random` and numpy's global RNG (what timm's transforms draw from) are
# seeded from the sample's aug_seed, so a sample's augmentation depends on its stream position only.
@functools.lru_cache(maxsize=8)
def _rand_augment(config, img_size, interpolation):
    # timm's hparams as create_transform sets them (translate 45% of the side, fill = ImageNet mean)
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN),
                   interpolation=RESAMPLE[interpolation])
    ra = rand_augment_transform(config, hparams)
    for op in ra.ops:  # Pillow 13 refuses posterize(img, 0), which timm's PosterizeIncreasing asks for at
        if op.aug_fn is timm_posterize:  # magnitude 10 (m9 + mstd0.5 gets there): 0 bits kept = black, as before
            op.aug_fn = _posterize
    return ra


def _posterize(img, bits_to_keep, **kw):
    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else timm_posterize(img, bits_to_keep, **kw)


def seed_sample(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def draft_scale(box_w, box_h, img_size):
    """The largest DCT reduction 1/k (k in 1, 2, 4, 8) that keeps a box_w x box_h box >= img_size."""
    k = 8
    while k > 1 and min(box_w, box_h) < k * img_size:
        k //= 2
    return k


JPEG_END = b'\xff\xd9'  # the EOI marker that ends every complete JPEG file


def load_rows(im, rows):
    """Decode only the first `rows` rows of an opened JPEG (drafted or not): libjpeg stops
    there, so the rows below a crop are never entropy-decoded. Other images load whole.
    A fatal libjpeg error inside those rows looks the same and passes (rare: libjpeg decodes
    through corrupt data with a warning, which Pillow ignores in a full decode too)."""
    if im.format != 'JPEG' or rows >= im.height or len(im.tile) != 1:
        im.load()
        return
    im.tile = [im.tile[0]._replace(extents=(0, 0, im.width, rows))]
    try:
        im.load()
    except OSError as e:  # libjpeg reports the unread rows as a broken stream once ours are decoded
        if 'broken data stream' not in str(e):
            raise


def load_train_image(src, seed, img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, auto_augment='',
                     interpolation='bilinear'):
    """Image file path or bytes -> uint8 (3, img_size, img_size) tensor: random resized crop
    (timm's distribution), horizontal flip with probability hflip, timm RandAugment
    (`auto_augment`, e.g. MAE's 'rand-m9-mstd0.5-inc1'; '' = none). Deterministic in seed."""
    seed_sample(seed)
    if not isinstance(src, (bytes, bytearray)):
        with open(src, 'rb') as f:
            src = f.read()
    im = Image.open(io.BytesIO(src))
    top, left, h, w = RandomResizedCropAndInterpolation.get_params(im, scale, ratio)  # header only, no decoding
    k = draft_scale(w, h, img_size) if im.format == 'JPEG' else 1
    if k > 1:
        width = im.width
        drafted = im.draft('RGB', (im.width // k, im.height // k))  # (mode, the full image in reduced pixels)
        k = width / drafted[1][2] if drafted else 1  # the scale the decoder will use
    # crop first, then resize, as timm does: the filter sees only the crop (clamped at its edges);
    # in a reduced image the box has fractional edges: crop the pixels it touches, resize the rest
    l, t, r, b = left / k, top / k, (left + w) / k, (top + h) / k
    x0, y0 = math.floor(l), math.floor(t)
    if src.endswith(JPEG_END):  # a file cut short is decoded whole, so it fails on every crop, not some
        load_rows(im, math.ceil(b))
    if im.mode != 'RGB':  # convert('RGB') of an RGB image would copy it
        im = im.convert('RGB')
    im = im.crop((x0, y0, math.ceil(r), math.ceil(b)))
    im = im.resize((img_size, img_size), RESAMPLE[interpolation], box=(l - x0, t - y0, r - x0, b - y0))
    if random.random() < hflip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if auto_augment:
        im = _rand_augment(auto_augment, img_size, interpolation)(im)
    # a (3, S, S) view of the HWC bytes: the batch's stack makes it contiguous in its one copy
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(img_size, img_size, 3).permute(2, 0, 1)


def train_transform(img_size, crop_scale=(0.08, 1.0), hflip=True, auto_augment='', interpolation='bilinear',
                    ratio=(3 / 4, 4 / 3)):
    """The training transform for image_folder_loader: (path, seed) -> uint8 (3, S, S) tensor.
    Anti-aliased bilinear by default: the paper's token reduction by resizing happens here."""
    return functools.partial(load_train_image, img_size=img_size, scale=tuple(crop_scale), ratio=tuple(ratio),
                             hflip=0.5 if hflip is True else float(hflip), auto_augment=auto_augment,
                             interpolation=interpolation)
