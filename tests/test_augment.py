"""Tests of augment.py, the augmentations applied on the device: soft_targets is timm's smoothed
one-hot, mix_batch is timm's Mixup/CutMix on the same seed without touching the caller's global
RNG, and random_erase is seeded and keeps pixels in range."""
import numpy as np
import pytest
import torch
from timm.data.mixup import Mixup

import augment
import decode


def test_soft_targets_are_timms_smoothed_one_hot():
    t = augment.soft_targets(torch.arange(8) % 5, 5, smoothing=0.1)
    assert torch.allclose(t.sum(1), torch.ones(8)) and t.max() == pytest.approx(0.92)
    assert torch.equal(t.argmax(1), torch.arange(8) % 5)
    # (MixUp / CutMix: test_mix_batch_is_timms_mixup_seeded, below)


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
