"""
The ImageFolder (ImageNet) pipeline: datasets, the endless training loader, the fixed
validation subset and its transform, and the DataLoader whose workers survive SIGTERM.
Images stay in [0,1]; normalisation happens inside the model.

Training data is an endless stream counted in samples, not epochs: each pass is a seeded
permutation, cut into global batches whose per-rank slices go to the ranks, so
1 process x batch 2B and 2 processes x batch B see the same samples, and the stream
position (samples consumed) is all a checkpoint needs to resume exactly. Augmentation
randomness is seeded per sample position, so it does not depend on workers or ranks.

Training images leave the workers as uint8 (augment.to_device() makes [0,1] floats on the
device); the training transform (decode.train_transform) decodes only what its crop needs.
Data kinds: an ImageFolder tree here; caption shards (img2dataset: .jpg + .txt) and labelled
shards (.jpg + .cls, the ImageNet-21K layout; make_shards.py writes them from an ImageFolder)
in webdata.py.
"""
import atexit
import multiprocessing
import os
import signal
import threading

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from demo_data import DEMO_CLASSES, DEMO_ROOT

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.ppm', '.tif', '.tiff', '.JPEG')


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
