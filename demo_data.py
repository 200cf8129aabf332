"""
The embedded demo dataset, generated once (ensure_demo) as an ImageFolder tree of PNGs and as
webdataset shards (.jpg, .txt, .cls); what it draws and why is said below.
"""
import io
import math
import os
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image, ImageDraw


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
    if _finished(root, stamp):
        return root
    # a folder of this process's own: two runs started at once on a fresh clone each build a
    # whole copy, and the first to finish is the one kept
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + '.tmp', dir=parent)
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
    if not _finished(root, stamp):  # no other process finished first: replace the stale or missing cache
        shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)  # atomic: a half-written cache is never mistaken for a finished one
        except OSError:  # another process renamed its copy in between
            if not _finished(root, stamp):
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def _finished(root, stamp):
    done = os.path.join(root, 'DONE')
    return os.path.exists(done) and open(done).read() == stamp
