"""
PGD, the inner maximisation of adversarial training, and the PGD-k evaluation metric.

All attacks work in [0,1] pixel space (the models normalise inside), take gradients with
respect to the input only (`torch.autograd.grad`: no weight gradients, and no DDP all-reduce
when called on the unwrapped module), and run the model in eval mode, restoring its mode
afterwards, as the official AdvXL code does.
"""
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F


def soft_cross_entropy(logits, targets):
    """Cross-entropy against soft targets (label smoothing, MixUp), in fp32 under autocast."""
    return F.cross_entropy(logits.float(), targets)


def _l2_norm(t):
    return t.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


def project(x_adv, x, eps, norm):
    """Project x_adv onto the eps-ball around x, then onto the [0,1] image box."""
    delta = x_adv - x
    if norm == 'Linf':
        delta = delta.clamp(-eps, eps)
    elif norm == 'L2':
        delta = delta * (eps / _l2_norm(delta)).clamp(max=1.0)
    else:
        raise ValueError(f"norm must be 'Linf' or 'L2', got '{norm}'")
    return (x + delta).clamp(0, 1)


def pgd(model, x, y, loss_fn, eps, step_size, steps, norm='Linf', random_start=True, freeze_weights=True,
        **forward_kwargs):
    """Maximise loss_fn(model(x_adv, **forward_kwargs), y) over x_adv in the eps-ball of x.
    y is whatever loss_fn takes as target: hard labels, MixUp/CutMix soft labels, or a batch
    of fixed text embeddings for the contrastive loss. Returns detached adversarial images.
    freeze_weights: the weights stop requiring grad during the attack, so autograd saves no
    activations for weight gradients and torch.compile's backward graph (which computes the
    gradient of every input that requires one, whatever autograd.grad asks) skips them."""
    x = x.detach()
    if steps == 0 or eps == 0:
        return x
    frozen = [p for p in model.parameters() if p.requires_grad] if freeze_weights else []
    try:
        for p in frozen:
            p.requires_grad_(False)
        return _pgd_steps(model, x, y, loss_fn, eps, step_size, steps, norm, random_start, forward_kwargs)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _pgd_steps(model, x, y, loss_fn, eps, step_size, steps, norm, random_start, forward_kwargs):
    was_training = model.training
    model.eval()
    x_adv = x.clone()
    if random_start:
        if norm == 'Linf':
            x_adv = x_adv + torch.empty_like(x).uniform_(-eps, eps)
        else:  # uniform radius along a uniformly random direction
            d = torch.randn_like(x)
            x_adv = x_adv + d / _l2_norm(d) * eps * torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device)
        x_adv = x_adv.clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv, **forward_kwargs), y)
        grad, = torch.autograd.grad(loss, [x_adv])
        with torch.no_grad():
            step = grad.sign() if norm == 'Linf' else grad / _l2_norm(grad)
            x_adv = project(x_adv + step_size * step, x, eps, norm)
    model.train(was_training)
    return x_adv.detach()


class TrueFp32:
    """fp32 matmuls and convolutions without TF32 (train.py turns TF32 on for training): what an
    evaluation in 'float32' means, in train.py's final table as in eval_autoattack.py. Reusable,
    like the autocast it stands in for (evaluate_pgd enters it once per batch)."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


@torch.no_grad()
def _count_correct(logits, y):
    return (logits.argmax(1) == y).sum()


def evaluate_pgd(model, loader, eps=4 / 255, steps=20, step_size=1 / 255, norm='Linf',
                 max_samples=None, autocast=None, log_every=0, log=print, group=None):
    """Clean and PGD-k robust accuracy (percent) over a loader of ([0,1] images, labels).
    Under torch.distributed, each rank evaluates its own loader and the counts are summed."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ce = lambda out, t: F.cross_entropy(out.float(), t)
    autocast = autocast or nullcontext()
    clean = robust = total = torch.zeros((), dtype=torch.long, device=device)
    t0 = time.time()
    for i, (x, y) in enumerate(loader):
        if max_samples is not None and total.item() >= max_samples:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            with torch.no_grad():
                clean = clean + _count_correct(model(x), y)
            x_adv = pgd(model, x, y, ce, eps, step_size, steps, norm)
            with torch.no_grad():
                robust = robust + _count_correct(model(x_adv), y)
        total = total + y.numel()
        if log_every and (i + 1) % log_every == 0:
            log(f"  eval: {total.item()} images, clean {100 * clean.item() / total.item():.1f}%, "
                f"PGD-{steps} {100 * robust.item() / total.item():.1f}% ({time.time() - t0:.0f}s)")
    model.train(was_training)
    counts = torch.stack([clean, robust, total])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, group=group)  # group: e.g. one whose timeout outlasts the slowest rank
    clean, robust, total = counts.tolist()
    return 100.0 * clean / max(total, 1), 100.0 * robust / max(total, 1), total
