"""
Data: the embedded demo dataset, the ImageFolder (ImageNet) pipeline and the webdataset
(LAION, DataComp) pipeline. Images stay in [0,1]; normalisation happens inside the model.

Training data is an endless stream counted in samples, not epochs: each pass is a seeded
permutation, cut into global batches whose per-rank slices go to the ranks, so
1 process x batch 2B and 2 processes x batch B see the same samples, and the stream
position (samples consumed) is all a checkpoint needs to resume exactly. Augmentation
randomness is seeded per sample position, so it does not depend on workers or ranks.

Training images leave the workers as uint8 (to_device() makes [0,1] floats on the device);
the augmentation is the MAE recipe's, from timm (RandomResizedCrop's distribution,
RandAugment, Mixup/CutMix, RandomErasing), with the crop decoded cheaply (load_train_image).
Data kinds: an ImageFolder tree, caption shards (img2dataset: .jpg + .txt) and labelled
shards (.jpg + .cls, the ImageNet-21K layout; make_shards.py writes them from an ImageFolder).
"""
import atexit
import contextlib
import functools
import gzip
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tarfile
import threading
from collections import namedtuple
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from timm.data.auto_augment import posterize as timm_posterize, rand_augment_transform
from timm.data.mixup import Mixup, mixup_target
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.ppm', '.tif', '.tiff', '.JPEG')
RESAMPLE = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}


# ----------------------------------------------------------------------------- demo data
# The embedded demo dataset: procedurally generated shapes, deterministic from a seed.
#
# Each image is one object whose CLASS IS ITS SHAPE (10 classes), drawn at a random position,
# scale and rotation, in a random named colour, over a randomly tinted textured background,
# with a caption such as "a photo of a small red star on a striped background".
#
# Why it looks the way it does (it has to be learnable *robustly* at eps 8/255 in minutes on a CPU):
# - The silhouette is the only thing that carries the label, and it is drawn with a large
#   luminance step (bright object on dark background: the object's luminance is >= ~65/255,
#   median ~140/255, above the background's mean, i.e. 8-17x eps), so a robust "shape" feature
#   exists that an 8/255 perturbation cannot erase.
# - Hue is random for both object and background (colour carries no label information), but
#   the object is always light and the background always dark. With fully random object and
#   background colours a small ViT learned nothing in 28k samples (measured when the demo was
#   designed), so the polarity is fixed.
# - Textures are low-amplitude (+-~18/255): visible, and a real nuisance for a non-robust
#   model, but far below the silhouette's contrast.
# - The shapes stay distinct at 16x16 (stage 1 trains at half resolution): they are large
#   (object radius 27-45% of the image side), rotation is limited to +-20 degrees (a square
#   stays a square, not a diamond), and look-alikes (hexagon vs circle, hollow square vs ring)
#   are left out.
# - Rendering: the silhouette is drawn with PIL at 4x and box-filtered down (an exact
#   anti-aliased coverage mask); backgrounds are computed directly at the target size with numpy.
#   13k images at 32 px take ~4 s on one idle core (13 s measured on a heavily shared one).
DEMO_CLASSES = ['circle', 'square', 'triangle', 'star', 'cross',
                'ring', 'diamond', 'crescent', 'heart', 'arrow']

# Named object colours (sRGB 0-255). All are light (luminance >= ~0.42, red being the darkest) so they stand out
# against the dark backgrounds whatever the hue; "blue" is a light, but still clearly blue, blue.
COLOURS = {
    'red':    (255, 80, 70),
    'orange': (255, 150, 30),
    'yellow': (250, 235, 60),
    'green':  (70, 225, 70),
    'cyan':   (60, 230, 235),
    'blue':   (90, 140, 255),
    'purple': (185, 100, 255),
    'pink':   (255, 125, 200),
    'white':  (240, 240, 240),
}
COLOUR_NAMES = list(COLOURS)
LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)  # Rec. 709 luminance weights
BACKGROUNDS = ['striped', 'checkered', 'dotted', 'noisy']
SIZES = ['small', 'large']
SUPERSAMPLE = 4  # draw the silhouette at 4x and box-filter down: anti-aliased edges for free
# object radius as a fraction of the image side: even 'small' objects are >= 8 px across at 16 px.
# (Smaller objects, 22-30% / 32-42%, learned measurably slower: 43% vs 55% clean after 20k clean samples.)
R_SMALL = (0.27, 0.33)
R_LARGE = (0.36, 0.45)


# ----------------------------------------------------------------------------- silhouettes
def _poly_unit(label):
    """Outline of a polygonal shape in unit coordinates (radius ~1, centred on 0, y down).
    Returns None for shapes drawn from ellipses (circle, ring, crescent)."""
    name = DEMO_CLASSES[label]
    if name == 'square':
        s = 0.8  # slightly inside the unit circle so its area matches the other shapes
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if name == 'triangle':  # pointing up, centroid at 0
        return [(0, -1.0), (0.95, 0.7), (-0.95, 0.7)]
    if name == 'diamond':  # tall rhombus: differs from a +-20 degree square by its aspect
        return [(0, -1.0), (0.65, 0), (0, 1.0), (-0.65, 0)]
    if name == 'star':  # 5 points, deep inner radius so the points survive at 16 px
        return [((1.0 if i % 2 == 0 else 0.42) * math.sin(i * math.pi / 5),
                 -(1.0 if i % 2 == 0 else 0.42) * math.cos(i * math.pi / 5)) for i in range(10)]
    if name == 'cross':  # plus sign with thick arms
        a, b = 0.95, 0.32
        return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
                (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    if name == 'heart':  # the classic parametric heart, point down
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return list(zip(x / 16.5, (y + 2.5) / 16.5))
    if name == 'arrow':  # pointing right: head plus shaft
        return [(-1.0, -0.25), (0.15, -0.25), (0.15, -0.7), (1.0, 0), (0.15, 0.7), (0.15, 0.25), (-1.0, 0.25)]
    return None


def _silhouette(label, cx, cy, r, angle, size):
    """Coverage mask in [0,1] (float32, size x size) of one shape centred at (cx, cy) in
    pixels, radius r pixels, rotated by angle radians."""
    S = size * SUPERSAMPLE
    img = Image.new('L', (S, S), 0)
    d = ImageDraw.Draw(img)
    cx, cy, r = cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE
    name = DEMO_CLASSES[label]
    if name == 'circle':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == 'ring':  # thick annulus, hole big enough to stay open at 16 px
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = 0.5 * r
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif name == 'crescent':  # a disc with an offset disc cut out, opening rotated by `angle`
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = 0.55 * r * math.cos(angle), 0.55 * r * math.sin(angle)
        ri = 0.85 * r
        d.ellipse([cx + ox - ri, cy + oy - ri, cx + ox + ri, cy + oy + ri], fill=0)
    else:
        c, s = math.cos(angle), math.sin(angle)
        pts = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _poly_unit(label)]
        d.polygon(pts, fill=255)
    img = img.resize((size, size), Image.BOX)  # exact area average = anti-aliased coverage
    return np.asarray(img, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- backgrounds
def _background(rng, kind, size):
    """A dark, randomly tinted, low-contrast texture (float32 HxWx3 in [0,1])."""
    # base: a dark colour of random hue (max channel 0.08-0.30), its luminance capped at 0.18
    # so that even the darkest object colour (red, luminance ~0.42) stands >= ~60/255 above it
    base = rng.uniform(0.0, 1.0, 3) * rng.uniform(0.08, 0.30)
    base *= min(1.0, 0.18 / max(float(base @ LUMA), 1e-6))
    amp = rng.uniform(0.04, 0.07)  # texture amplitude: visible, but << the shape's contrast
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # coordinates in image units
    if kind == 'striped':
        theta = rng.uniform(0, math.pi)
        freq = rng.uniform(3, 6)  # stripes per image side: still visible at 16 px
        phase = rng.uniform(0, 2 * math.pi)
        t = np.sign(np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase))
    elif kind == 'checkered':
        n = rng.integers(3, 7)  # squares per side
        ox, oy = rng.uniform(0, 1, 2)
        t = np.where((np.floor(xx * n + ox) + np.floor(yy * n + oy)) % 2 == 0, 1.0, -1.0)
    elif kind == 'dotted':
        n = rng.integers(3, 6)  # dots per side
        ox, oy = rng.uniform(0, 1, 2)
        fx, fy = (xx * n + ox) % 1 - 0.5, (yy * n + oy) % 1 - 0.5
        t = np.where(fx ** 2 + fy ** 2 < 0.2 ** 2, 1.0, -0.3)
    else:  # noisy: blocky value noise, upsampled, plus a little pixel noise
        cells = rng.integers(4, 9)
        coarse = rng.uniform(-1, 1, (cells, cells))
        idx = (np.arange(size) * cells) // size
        t = 0.7 * coarse[idx][:, idx] + 0.3 * rng.uniform(-1, 1, (size, size))
    tint = 0.5 + 0.5 * rng.uniform(0, 1, 3)  # texture slightly coloured too
    bg = base[None, None, :] + amp * t[..., None].astype(np.float32) * tint[None, None, :]
    return np.clip(bg, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- images
def render(rng, label, size=32):
    """One image of class `label`: (size x size x 3 uint8 array, caption string)."""
    big = rng.random() < 0.5
    r = size * rng.uniform(*(R_LARGE if big else R_SMALL))  # object radius in pixels
    margin = 0.9 * r  # keep (nearly) the whole object in frame
    cx, cy = rng.uniform(margin, size - margin, 2)
    angle = math.radians(rng.uniform(-20, 20))
    if DEMO_CLASSES[label] == 'crescent':
        angle = rng.uniform(0, 2 * math.pi)  # a crescent may open in any direction
    mask = _silhouette(label, cx, cy, r, angle, size)[..., None]
    colour_name = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    fg = np.array(COLOURS[colour_name], np.float32) / 255.0
    fg = np.clip(fg * rng.uniform(0.95, 1.05), 0, 1)  # slight brightness jitter, same hue
    bg_kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    bg = _background(rng, bg_kind, size)
    img = bg * (1 - mask) + fg[None, None, :] * mask
    img = np.round(img * 255).clip(0, 255).astype(np.uint8)
    caption = (f"{DEMO_CLASSES[label]}: a {'large' if big else 'small'} {colour_name} {DEMO_CLASSES[label]} on "
               f"{dict(striped='stripes', checkered='checks', dotted='dots', noisy='noise')[bg_kind]}")
    return img, caption


def make_split(n, seed, size=32):
    """n images balanced over the classes (labels cycle, then are shuffled), all drawn from
    one numpy Generator seeded with `seed`: same seed, same bytes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(DEMO_CLASSES)
    rng.shuffle(labels)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions = []
    for i, y in enumerate(labels):
        images[i], cap = render(rng, int(y), size)
        captions.append(cap)
    return images, labels, captions


DEMO_ROOT = 'data_cache/demo'
DEMO_VERSION = 3  # bump when the generator changes: a cache written by another version is rebuilt


def ensure_demo(root=DEMO_ROOT, n_train=12000, n_val=1000, seed=0, shard_size=1000):
    """Generate the demo dataset once: an ImageFolder tree (train/, val/ of PNGs) and
    webdataset shards (shards/{train,val}-NNNN.tar with .jpg, .txt, .cls). Returns root."""
    stamp = f'demo v{DEMO_VERSION}: {n_train} train, {n_val} val, seed {seed}\n'
    done = os.path.join(root, 'DONE')
    if os.path.exists(done) and open(done).read() == stamp:
        return root
    tmp = root + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n, split_seed in (('train', n_train, seed), ('val', n_val, seed + 1)):
        images, labels, captions = make_split(n, split_seed)
        for name in DEMO_CLASSES:
            os.makedirs(os.path.join(tmp, split, name), exist_ok=True)
        os.makedirs(os.path.join(tmp, 'shards'), exist_ok=True)
        for start in range(0, n, shard_size):
            with tarfile.open(os.path.join(tmp, 'shards', f'{split}-{start // shard_size:04d}.tar'), 'w') as tar:
                for i in range(start, min(n, start + shard_size)):
                    key = f'{split}_{i:06d}'
                    img = Image.fromarray(images[i])
                    img.save(os.path.join(tmp, split, DEMO_CLASSES[labels[i]], key + '.png'))
                    buf = io.BytesIO()
                    img.save(buf, format='JPEG', quality=95)
                    for ext, payload in (('jpg', buf.getvalue()), ('txt', captions[i].encode()),
                                         ('cls', str(int(labels[i])).encode())):
                        info = tarfile.TarInfo(f'{key}.{ext}')
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    open(os.path.join(tmp, 'DONE'), 'w').write(stamp)
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)  # atomic: a half-written cache is never mistaken for a finished one
    return root


# ----------------------------------------------------------------------------- ImageFolder
def class_names(root):
    """Class names in label order for an ImageFolder root: its sorted subfolder names (the
    demo's known without generating it; note they are not in DEMO_CLASSES order)."""
    if os.path.abspath(root).startswith(os.path.abspath(DEMO_ROOT) + os.sep):
        return sorted(DEMO_CLASSES)
    return ImageFolderSafe(root, None).classes


def list_image_folder(root):
    """(classes, [(path, label)]) of an ImageNet-style folder of class subfolders, sorted."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    samples = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
               for f in sorted(os.listdir(os.path.join(root, c))) if f.endswith(IMG_EXTENSIONS)]
    return classes, samples


class ImageFolderSafe(Dataset):
    """ImageNet-style folder of class subfolders. An unreadable image yields None (the collate
    function drops and counts it) instead of killing the run. Items are (index, aug_seed).
    `transform` takes a PIL image, or with from_file=True the file path and the seed (the
    training transform, which decodes only what its crop needs)."""

    def __init__(self, root, transform, from_file=False):
        if not os.path.isdir(root):
            raise SystemExit(f"data folder not found: {root} (set --data / --train_data to an ImageFolder "
                             f"root with one subfolder per class, or leave data='demo')")
        self.classes, self.samples = list_image_folder(root)
        if not self.samples:
            raise SystemExit(f"no images found under {root} (expected {root}/<class>/<image>.jpg|png)")
        self.transform, self.from_file = transform, from_file

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, aug_seed = item
        path, label = self.samples[index]
        try:
            if self.from_file:
                return self.transform(path, aug_seed), label
            with Image.open(path) as img:
                img = img.convert('RGB')
        except Exception:  # truncated, corrupt or not an image at all
            return None
        torch.manual_seed(aug_seed)  # torchvision's random transforms draw from torch's global RNG
        return self.transform(img), label


def collate_skip_bad(batch):
    good = [b for b in batch if b is not None]
    x = torch.stack([b[0] for b in good]) if good else torch.zeros(0, dtype=torch.uint8)
    y = torch.tensor([b[1] for b in good], dtype=torch.long)
    return x, y, len(batch) - len(good)


def collate_drop_bad(batch):
    return collate_skip_bad(batch)[:2]


def _ignore_sigterm(worker_id):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a SIGTERM that came while blocked is dropped here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])


class SigtermSafeLoader(DataLoader):
    """torch's DataLoader whose workers ignore SIGTERM. A SIGTERM to the process group (SLURM,
    k8s) must reach only the trainer, which checkpoints; a worker killed by it would make the
    DataLoader raise before the checkpoint is written. Workers are forked with SIGTERM blocked,
    so one sent while a worker starts up waits, and is dropped once the worker ignores it."""

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, worker_init_fn=_ignore_sigterm, **kwargs)

    def __iter__(self):
        old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])  # the trainer's own SIGTERM waits
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


@atexit.register  # registered after multiprocessing's own exit handler, so it runs before it
def _kill_workers_at_exit():
    # at exit multiprocessing terminates every daemonic child (DataLoader workers are) with SIGTERM
    # and then waits for it; workers that ignore SIGTERM would make that wait forever, so do the
    # same first with SIGKILL (torch's SIGCHLD handler would report that as a worker failure)
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except OSError:
            pass


class SampleStream(Sampler):
    """Endless per-rank stream of (index, aug_seed). Pass p is a permutation seeded by
    (seed, p), cut into global batches of world*batch_size; rank r takes slice r of each.
    `start` is the number of samples this rank has already consumed (the resume point)."""

    def __init__(self, n, batch_size, rank=0, world=1, seed=0, start=0):
        self.n, self.bs, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start
        self.global_bs = batch_size * world
        self.per_pass = n // self.global_bs * self.global_bs  # drop the ragged tail of each pass
        if self.per_pass == 0:
            raise SystemExit(f"dataset of {n} images is smaller than one global batch ({self.global_bs}); lower batch_size")

    def __iter__(self):
        pos = self.start
        while True:
            p, local = divmod(pos, self.per_pass // self.world)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + p))
            for q in range(local, self.per_pass // self.world):
                batch, within = divmod(q, self.bs)
                j = batch * self.global_bs + self.rank * self.bs + within  # position in this pass
                yield int(perm[j]), (self.seed * 1_000_003 + p) * 10_000_019 + j
            pos = (p + 1) * (self.per_pass // self.world)


# ----------------------------------------------------------------------------- the training transform
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


def val_transform(img_size, crop_pct=0.875, interpolation='bilinear'):
    """Evaluation preprocessing, float [0,1]: resize the short side to int(img_size / crop_pct),
    then center crop. eval_autoattack.py uses this same function (on ImageNet by default as the
    official AdvXL evaluation does it: crop_pct 0.9, bicubic; the ImageNet configs set the same
    val_crop_pct / val_interpolation, so training-time validation matches the evaluator)."""
    mode = T.InterpolationMode.BICUBIC if interpolation == 'bicubic' else T.InterpolationMode.BILINEAR
    return T.Compose([T.Resize(int(img_size / crop_pct), interpolation=mode, antialias=True),
                      T.CenterCrop(img_size), T.ToTensor()])


def image_folder_loader(root, transform, batch_size, rank=0, world=1, seed=0, start=0, num_workers=2):
    """Endless training loader; yields (uint8 images, labels, n_bad) per rank. `transform` is
    train_transform(...): (path, seed) -> uint8 tensor."""
    ds = ImageFolderSafe(root, transform, from_file=True)
    stream = SampleStream(len(ds), batch_size, rank, world, seed, start)
    return SigtermSafeLoader(ds, sampler=stream, batch_size=batch_size, collate_fn=collate_skip_bad,
                             num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                             persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)


class _Fixed(Sampler):
    def __init__(self, indices):
        self.indices = indices

    def __iter__(self):
        return iter((i, 0) for i in self.indices)

    def __len__(self):
        return len(self.indices)


def val_loader(root, transform, batch_size, max_samples=None, rank=0, world=1, num_workers=2, seed=0):
    """A fixed validation subset (the same images every evaluation), sharded across ranks.
    The subset is a seeded random choice, so a class-sorted folder still gives all classes."""
    ds = ImageFolderSafe(root, transform)
    n = len(ds) if max_samples is None else min(max_samples, len(ds))
    subset = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
    return SigtermSafeLoader(ds, sampler=_Fixed(subset[rank::world]), batch_size=batch_size,
                             collate_fn=collate_drop_bad, num_workers=num_workers)


# ----------------------------------------------------------------------------- on the device
# Workers hand over uint8; the rest of the recipe runs on the device, on the whole batch, with
# timm's implementations, its randomness seeded per step (exact resume).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def to_device(x, device):
    """A batch tensor to the device without blocking the host (from pinned memory on CUDA); a
    uint8 image batch becomes [0,1] floats there (the copy moves 1/4 of float32's bytes)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def soft_targets(y, num_classes, smoothing=0.0):
    """One-hot targets with label smoothing (timm's)."""
    return mixup_target(y, num_classes, 1.0, smoothing)


@contextlib.contextmanager
def _seeded_global_rngs(seed):
    # timm's Mixup and RandomErasing draw from numpy's / python's global RNGs: seed them for
    # this step only and give the caller's state back
    np_state, py_state = np.random.get_state(), random.getstate()
    seed_sample(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state), random.setstate(py_state)


def mix_batch(x, targets, mixup_alpha=0.0, cutmix_alpha=0.0, seed=None):
    """timm's Mixup as the MAE recipe runs it: per batch, mixup or cutmix with equal odds when
    both are on, the batch mixed with its reverse, cutmix's lam corrected to the pasted area.
    x: float images on the device (even batch); targets: soft_targets(y, num_classes, smoothing),
    i.e. timm's smoothed one-hot, which timm mixes the same way. Returns (mixed x, mixed targets).
    seed: the draws are a function of it (exact resume); None takes it from torch's global
    RNG, which train.py seeds per (step, rank)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, targets
    if seed is None:
        seed = int(torch.randint(2 ** 62, ()))
    mixer = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=0.0,
                  num_classes=targets.shape[1], multi_label=True)  # dense targets, mixed as they are
    with _seeded_global_rngs(seed):
        return mixer(x, targets)


def random_erase(x, prob, seed=None):
    """timm's RandomErasing as MAE's fine-tuning uses it (mode 'pixel': per-pixel normal noise in
    normalised space, one box) on a float [0,1] batch on the device; erased pixels are clamped
    to [0,1], the box the attack and the model see. Deterministic in seed (None: taken from
    torch's global RNG, which train.py seeds per step)."""
    if prob <= 0:
        return x
    if seed is None:
        seed = int(torch.randint(2 ** 62, ()))
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    with _seeded_global_rngs(seed), torch.random.fork_rng(devices=[x.device] if x.device.type == 'cuda' else []):
        torch.manual_seed(seed % 2 ** 63)
        z = RandomErasing(prob, mode='pixel', device=x.device)((x - mean) / std)
    return (z * std + mean).clamp_(0, 1)


# ----------------------------------------------------------------------------- webdataset
# Image-text webdataset shards (img2dataset layout: {key}.jpg|png|webp, {key}.txt, optional
# {key}.json and {key}.cls) as an endless, resumable, DDP-aware stream for the web-scale
# contrastive stage; labelled shards ({key}.jpg + {key}.cls) through the same stream for
# supervised stages (WebLoader(labelled=True)).
#
# Why our own tar reading and not webdataset's pipeline: webdataset 1.0.2 has no resume, its
# resampled shard lists draw shards with replacement (duplicates within a pass), and its
# error handlers drop samples without telling anyone. Here each stream reads its shards
# itself, so a position is just (shard counter, samples read from that shard) and every
# skipped sample is counted. webdataset is still used for what it does well: pattern
# expansion (braces, '::', env vars) and opening local files, `pipe:` commands and URLs.
#
# Layout: global stream g = rank * num_workers + worker reads the shard sequence
# S[base + g + k*G], k = 0, 1, ..., where G = world_size * num_workers and S is the endless
# concatenation of per-pass permutations of the shard list (seeded by (seed, pass)). Within
# a pass every shard is read exactly once, by one stream; fewer shards than streams is fine.
#
# Resume is exact: a batch carries its stream's state (shard counter, samples read, the
# shuffle buffer as (shard counter, index) references, batch counter); all randomness of a
# batch (shuffle draws, crops, flips) is seeded by (seed, stream, batch counter); and the
# DataLoader's worker round-robin is rotated to restart at the stream that was due. So a
# resumed run yields the same batches, in the same order, as an uninterrupted one, given
# the same shards, seed, world size, num_workers, batch size and buffer size (resuming
# refills each buffer by re-reading its last few shards). With another layout the streams
# restart from the earliest open shard: up to G shards are read twice and the buffers'
# contents are lost (a one-line warning says so). Batches the loader had prefetched but the
# training loop had not consumed are produced again, as they should be.
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
KEEP_EXTS = IMAGE_EXTS + ('txt', 'cls')
SKIP_KINDS = ('bad_samples', 'bad_shards')  # undecodable/incomplete samples; truncated/unreadable shards

WebBatch = namedtuple('WebBatch', 'image text key label')  # label: LongTensor, -1 where no .cls, or None


# -------------------------------------------------------------------- shards
def _local_path(url):
    """The file a url names, or None for pipes and remote urls (checked when opened)."""
    scheme = urlparse(url).scheme
    if scheme == 'file':
        return url2pathname(urlparse(url).path)
    return url if scheme == '' and url != '-' else None


def expand_shards(pattern):
    """'/data/laion/{00000..41407}.tar' (or '::'-joined patterns, or a list) -> list of
    urls. Local files are checked up front: a missing one is a one-line error."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls = [u for p in patterns for u in expand_urls(p)]
    if not urls:
        raise SystemExit(f"no shards match '{pattern}'")
    missing = [u for u in urls if _local_path(u) is not None and not os.path.isfile(_local_path(u))]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)} shards)" if len(missing) > 1 else ''
        raise SystemExit(f"missing shard: {missing[0]}{more}")
    return urls


_ZERO_BLOCK = bytes(512)


def _read_exact(f, n):
    data = f.read(n)
    if len(data) < n:
        raise EOFError(f"truncated tar member ({len(data)} of {n} bytes)")
    return data


def _skip(f, n):  # read, not seek: a truncated shard must still fail here
    while n:
        n -= len(_read_exact(f, min(n, 1 << 20)))


def tar_members(f):
    """(name, read) for each regular file of an uncompressed tar stream (ustar, GNU or pax
    format); read() returns the member's bytes, and a member not read is skipped. tarfile
    parses every field of every header in Python; this reads only the fields a shard needs,
    and still checks every header's checksum."""
    long_name = None
    while True:
        h = f.read(512)
        if not h or h == _ZERO_BLOCK:  # end of archive (tarfile also accepts a stream without one)
            return
        if len(h) < 512:
            raise EOFError("truncated tar header")
        stored = int(h[148:156].split(b'\0', 1)[0].strip() or b'0', 8)
        unsigned = sum(h) - sum(h[148:156]) + 256
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in h[:148] + h[156:]):
            raise ValueError("bad tar header checksum (a damaged shard, or not an uncompressed tar)")
        if h[124] & 0x80:  # base-256 size (members over 8 GiB)
            size = int.from_bytes(h[125:136], 'big')
        else:
            size = int(h[124:136].split(b'\0', 1)[0].strip() or b'0', 8)
        kind, pad = h[156:157], -size % 512
        if kind in (b'L', b'x'):  # GNU long name / pax extended header: they name the next member
            meta = _read_exact(f, size)
            _skip(f, pad)
            if kind == b'L':
                long_name = meta.split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')
            else:  # records "<len> key=value\n"; a pax size would override the header's (only > 8 GiB)
                for rec in meta.split(b'\n'):
                    if b' path=' in rec:
                        long_name = rec.split(b'=', 1)[1].decode('utf-8', 'surrogateescape')
            continue
        name = long_name or h[:100].split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')
        if long_name is None and h[257:263] == b'ustar\0' and h[345] != 0:  # POSIX ustar name prefix
            name = h[345:500].split(b'\0', 1)[0].decode('utf-8', 'surrogateescape') + '/' + name
        long_name = None
        if kind not in (b'0', b'\0', b'7'):  # directories, links, global pax headers: no file data to use
            _skip(f, size + pad)
            continue
        done = []

        def read():
            done.append(True)
            return _read_exact(f, size)
        yield name, read
        _skip(f, pad if done else size + pad)


def _open_tar(url):
    """A shard's byte stream; .tar.gz / .tgz shards (or a gzip stream under any name, where
    the stream can peek) are decompressed on the fly."""
    stream = gopen(url, 'rb')
    magic = stream.peek(2)[:2] if hasattr(stream, 'peek') else b''
    if magic == b'\x1f\x8b' or url.endswith(('.gz', '.tgz')):
        return gzip.GzipFile(fileobj=stream, mode='rb'), stream
    return stream, stream


def iter_tar_samples(url, skip=0, wanted=None, keep=KEEP_EXTS):
    """(index, sample) for the samples of one shard, a sample being {'__key__', ext: bytes}
    of consecutive members sharing a key (webdataset's grouping). Samples with index < skip,
    or not in `wanted`, are counted but their bytes not read. A truncated or unreadable
    shard raises (EOFError, ValueError, OSError, ...) after the last complete sample; the
    sample being read when it broke is never yielded."""
    last = max(wanted) if wanted else None
    f, stream = _open_tar(url)
    try:
        cur, idx = None, -1
        use = lambda i: i >= skip and (wanted is None or i in wanted)
        for name, read in tar_members(f):
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if cur is None or key != cur['__key__']:
                if cur is not None and use(idx):
                    yield idx, cur
                if last is not None and idx >= last:
                    return
                idx, cur = idx + 1, {'__key__': key}
            ext = ext.lower()
            if ext in keep and use(idx):
                cur[ext] = read()
        if cur is not None and use(idx):
            yield idx, cur
    finally:
        try:
            stream.close()
        except Exception:  # a pipe closed early may report a non-zero status
            pass


# -------------------------------------------------------------------- decoding
def decode_sample(s, img_size, rng, train=True, labelled=False, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                  auto_augment='', interpolation='bilinear'):
    """Raw sample -> (uint8 (3, S, S) tensor, caption, key, label). Train: load_train_image
    (random resized crop, open_clip's default scale (0.9, 1), flip, optional RandAugment) seeded
    from rng; eval: resize the short side and centre-crop. Caption shards need a .txt, labelled
    shards (.jpg + .cls, the ImageNet-21K layout) a .cls. Raises on anything undecodable."""
    data = next((s[e] for e in IMAGE_EXTS if e in s), None)
    if data is None or ('cls' if labelled else 'txt') not in s:
        raise ValueError(f"sample has no image or no {'label' if labelled else 'caption'}")
    text = s['txt'].decode('utf-8', errors='replace') if 'txt' in s else ''
    label = int(s['cls'].decode().strip()) if 'cls' in s else -1
    if train:
        img = load_train_image(data, int(rng.integers(2 ** 63)), img_size, scale, ratio, hflip, auto_augment,
                               interpolation)
        return img, text, s['__key__'], label
    im = Image.open(io.BytesIO(data))
    im.draft('RGB', (img_size, img_size))  # JPEG: decode at a reduced scale (DCT-domain, fast) no smaller than S x S
    im = im.convert('RGB')
    w, h = im.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    im = im.resize((img_size, img_size), RESAMPLE[interpolation], box=box)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()), text, s['__key__'], label


# -------------------------------------------------------------------- streams
def shard_index(pos, n_shards, seed):
    """Shard at position pos of the endless sequence: pass pos // n, permuted per pass."""
    p, i = divmod(pos, n_shards)
    return int(np.random.default_rng([seed, p]).permutation(n_shards)[i])


def new_stream_state():
    return {'k': 0, 'n': 0, 'b': 0, 'buf': [], 'skipped': dict.fromkeys(SKIP_KINDS, 0)}


class _Reader:
    """Reads the stream's shards in order; (k, n) = shard counter and samples read from it."""

    def __init__(self, ds, g, st):
        self.ds, self.g, self.k, self.n, self.skipped = ds, g, st['k'], st['n'], st['skipped']
        self.it = None

    def url(self, k):
        ds = self.ds
        return ds.urls[shard_index(ds.base + self.g + k * ds.G, len(ds.urls), ds.seed)]

    def next(self):
        while True:
            if self.it is None:
                self.it = iter_tar_samples(self.url(self.k), skip=self.n)
            try:
                j, s = next(self.it)
                self.n = j + 1
                return (self.k, j), s
            except StopIteration:
                pass
            except Exception as e:
                self.skipped['bad_shards'] += 1
                print(f"webdata: skipping the rest of {self.url(self.k)}: {type(e).__name__}: {e}", file=sys.stderr)
            self.it, self.k, self.n = None, self.k + 1, 0

    def refill(self, refs):
        """Re-read the samples a checkpointed shuffle buffer held (a few recent shards)."""
        got = {}
        for k in sorted({k for k, _ in refs}):
            want = {j for kk, j in refs if kk == k}
            try:
                for j, s in iter_tar_samples(self.url(k), skip=min(want), wanted=want):
                    got[(k, j)] = s
            except Exception:
                pass
        lost = sum((k, j) not in got for k, j in refs)
        self.skipped['bad_samples'] += lost
        return [((k, j), got[(k, j)]) for k, j in refs if (k, j) in got]


class WebStream(IterableDataset):
    """Each (rank, worker) yields whole batches from its own stream: (uint8 or float
    images, captions, keys, labels, meta) with meta = {'stream', 'state'}."""

    def __init__(self, urls, img_size, batch_size, rank, world_size, num_workers, seed, shuffle_buffer,
                 streams, base, first_worker, train, uint8, decode_kw):
        super().__init__()
        self.urls, self.img_size, self.batch_size = urls, img_size, batch_size
        self.rank, self.W = rank, max(1, num_workers)
        self.G = world_size * self.W
        self.seed, self.buffer, self.streams, self.base = seed, max(1, shuffle_buffer), streams, base
        self.first_worker, self.train, self.uint8, self.decode_kw = first_worker, train, uint8, decode_kw

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        g = self.rank * self.W + (wid + self.first_worker) % self.W  # rotation: resume where the round-robin stopped
        st = self.streams.get(g) or new_stream_state()
        st = {**st, 'skipped': dict(st['skipped'])}
        reader = _Reader(self, g, st)
        buf = reader.refill([tuple(r) for r in st['buf']])
        b = st['b']
        while True:
            rng = np.random.default_rng([self.seed, g, b])  # a batch's randomness depends on (seed, stream, batch) only
            imgs, texts, keys, labels = [], [], [], []
            while len(imgs) < self.batch_size:
                while len(buf) < self.buffer:
                    buf.append(reader.next())
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                _, s = buf.pop()
                try:
                    img, text, key, label = decode_sample(s, self.img_size, rng, self.train, **self.decode_kw)
                except Exception:
                    reader.skipped['bad_samples'] += 1
                    continue
                imgs.append(img), texts.append(text), keys.append(key), labels.append(label)
            b += 1
            # numpy, not torch: tiny torch ops on a busy CPU wait on the intra-op thread pool (100x slower)
            x = np.stack([i.numpy() for i in imgs])
            x = torch.from_numpy(x if self.uint8 else x.astype(np.float32) / np.float32(255))
            state = {'k': reader.k, 'n': reader.n, 'b': b, 'buf': [list(r) for r, _ in buf],
                     'skipped': dict(reader.skipped)}
            # the state as one string: the DataLoader would otherwise walk (default_convert) and pickle
            # the buffer's references element by element, for every batch
            yield x, texts, keys, torch.tensor(labels), {'stream': g, 'state': json.dumps(state)}


class WebLoader:
    """Endless batches WebBatch(image (B,3,S,S) in [0,1], or uint8 with uint8=True, text
    list[str], key list[str], label LongTensor or None) for this rank. labelled=True reads
    labelled shards (.cls required, no caption needed: text is ''); otherwise a caption is
    required. decode_kw: decode_sample's (scale, ratio, hflip, auto_augment, interpolation).
    Counts exactly what it yields (`samples`, `batches`) and what it skipped (`skipped`: totals
    over this rank's streams; `skipped_last`: in the latest batch), and `state_dict()` restores
    the stream exactly (see the module docstring). Iterating again continues from the current state."""

    def __init__(self, pattern, img_size, batch_size, rank=0, world_size=1, seed=0, num_workers=2,
                 shuffle_buffer=1000, state=None, train=True, uint8=False, pin_memory=False, **decode_kw):
        self.urls = expand_shards(pattern)
        self.img_size, self.batch_size, self.rank, self.world_size = img_size, batch_size, rank, world_size
        self.seed, self.num_workers, self.shuffle_buffer = seed, num_workers, shuffle_buffer
        self.train, self.uint8, self.pin_memory, self.decode_kw = train, uint8, pin_memory, decode_kw
        self.streams, self.base, self.batches, self.samples = {}, 0, 0, 0
        self.skipped_last = dict.fromkeys(SKIP_KINDS, 0)
        if state:
            self.load_state_dict(state)

    def layout(self):
        return {'n_shards': len(self.urls), 'world_size': self.world_size, 'num_workers': max(1, self.num_workers),
                'seed': self.seed, 'batch_size': self.batch_size, 'shuffle_buffer': self.shuffle_buffer}

    @property
    def skipped(self):
        return {k: sum(st['skipped'][k] for st in self.streams.values()) for k in SKIP_KINDS}

    def state_dict(self):
        # only this rank's own streams: after a resume self.streams also holds the other ranks'
        # (stale) states, which must not reach the checkpoint
        W = max(1, self.num_workers)
        own = {g: st for g, st in self.streams.items() if g // W == self.rank}
        return {'layout': self.layout(), 'base': self.base, 'streams': own,
                'ranks': {self.rank: {'batches': self.batches, 'samples': self.samples}}}

    def load_state_dict(self, state):
        r = state['ranks'].get(self.rank) or state['ranks'].get(str(self.rank)) or {'batches': 0, 'samples': 0}
        self.batches, self.samples = r['batches'], r['samples']
        streams = {int(g): st for g, st in state['streams'].items()}
        if state['layout'] == self.layout():
            self.base, self.streams = state['base'], streams
            return
        # another layout: restart every stream at the earliest shard any stream had open
        old = state['layout']
        G = old['world_size'] * old['num_workers']
        pos = [state['base'] + g + st['k'] * G for g, st in streams.items()]
        self.base, self.streams = (min(pos) if pos else 0), {}
        print(f"webdata: resuming with another layout ({old} -> {self.layout()}): restarting at shard position "
              f"{self.base}; up to {G} shards are read twice and the shuffle buffers are lost", file=sys.stderr)

    def __iter__(self):
        W = max(1, self.num_workers)
        ds = WebStream(self.urls, self.img_size, self.batch_size, self.rank, self.world_size, self.num_workers,
                       self.seed, self.shuffle_buffer, dict(self.streams), self.base, self.batches % W, self.train,
                       self.uint8, self.decode_kw)
        # its own generator: starting the DataLoader draws a seed, which must not come from torch's global
        # RNG (train.py seeds it per step, and a resumed run starts this iterator at another step)
        dl = SigtermSafeLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                               persistent_workers=False, generator=torch.Generator().manual_seed(self.seed))
        for x, texts, keys, labels, meta in dl:
            state = json.loads(meta['state'])
            prev = self.streams.get(meta['stream'], new_stream_state())['skipped']
            self.skipped_last = {k: state['skipped'][k] - prev[k] for k in SKIP_KINDS}
            self.streams[meta['stream']] = state
            self.batches += 1
            self.samples += len(texts)
            yield WebBatch(x, texts, keys, labels if bool((labels >= 0).all()) else None)


def web_loader(pattern, img_size, batch_size, rank=0, world_size=1, seed=0, num_workers=2, state=None, **kw):
    """See WebLoader. Under DDP, checkpoint all ranks' states:
        states = [None] * world; dist.all_gather_object(states, loader.state_dict())
        ckpt['data'] = merge_states(states)     # every rank then resumes from ckpt['data']"""
    return WebLoader(pattern, img_size, batch_size, rank, world_size, seed, num_workers, state=state, **kw)


def merge_states(states):
    """One state from the per-rank state_dicts (streams are keyed by global stream id
    g = rank * num_workers + worker). Stream g's state comes from its owner, rank
    g // num_workers, whatever the order of `states` and whatever else a rank reported."""
    W = states[0]['layout']['num_workers']
    out = {'layout': states[0]['layout'], 'base': states[0]['base'], 'streams': {}, 'ranks': {}}
    for s in states:
        out['ranks'].update(s['ranks'])
        ranks = {int(r) for r in s['ranks']}
        for g, st in s['streams'].items():
            if int(g) // W in ranks or int(g) not in out['streams']:  # the owner's copy wins
                out['streams'][int(g)] = st
    return out
