"""
On-device augmentation of a training batch: uint8 to [0,1] floats (to_device), label-smoothed
targets, timm's Mixup/CutMix (mix_batch) and RandomErasing (random_erase), seeded per step.
"""
import contextlib
import functools
import random

import numpy as np
import torch
from timm.data.mixup import Mixup, mixup_target
from timm.data.random_erasing import RandomErasing

from decode import seed_sample
from model import IMAGENET_MEAN, IMAGENET_STD


# Workers hand over uint8; the rest of the recipe runs on the device, on the whole batch, with
# timm's implementations, its randomness seeded per step (exact resume).
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


@functools.lru_cache(maxsize=None)
def _channel_constants(device, values):
    """A (1, C, 1, 1) tensor of per-channel values on the device, made once and filled there: a
    tensor built from Python data on a GPU is a blocking copy from pageable memory."""
    t = torch.empty(1, len(values), 1, 1, device=device)
    for c, v in enumerate(values):
        t[:, c].fill_(v)
    return t


def random_erase(x, prob, seed=None):
    """timm's RandomErasing as MAE's fine-tuning uses it (mode 'pixel': per-pixel normal noise in
    normalised space, one box) on a float [0,1] batch on the device; erased pixels are clamped
    to [0,1], the box the attack and the model see. Deterministic in seed (None: taken from
    torch's global RNG, which train.py seeds per step)."""
    if prob <= 0:
        return x
    if seed is None:
        seed = int(torch.randint(2 ** 62, ()))
    mean, std = _channel_constants(x.device, IMAGENET_MEAN), _channel_constants(x.device, IMAGENET_STD)
    with _seeded_global_rngs(seed), torch.random.fork_rng(devices=[x.device] if x.device.type == 'cuda' else []):
        torch.manual_seed(seed % 2 ** 63)
        z = RandomErasing(prob, mode='pixel', device=x.device)((x - mean) / std)
    return (z * std + mean).clamp_(0, 1)
