"""
AutoAttack (Croce & Hein 2020), a faithful port of the official fra31/auto-attack code
(shipped unchanged in `pyautoattack` 0.2.0: the reference the tests compare against).

    python eval_autoattack.py --ckpt out/ckpt.pt                          # demo val, L_inf 4/255
    python eval_autoattack.py --ckpt advxl_vith14.pt --arch vit_huge_patch14 --data /imagenet
    torchrun --nproc_per_node 8 eval_autoattack.py --ckpt ... --norm L2   # sharded over ranks
    python eval_autoattack.py --ckpt ... --data /imagenet --dry_run       # model, data, batch; no attack

Under torchrun, rank r evaluates the points r, r + world, ... from start to end on its own, as
the official multi-GPU AdvXL evaluation does, and keeps its own resume file; the ranks meet once,
at the end. The batch (--bs 0) is the official 250 where the memory plan fits it on the device,
else the largest that fits; an out-of-memory error halves it for the rest of the run.

Same algorithms, hyper-parameters, random streams (the global RNG re-seeded for every attack
on every batch, as the official code does) and floating-point operations: from the same start,
APGD and FAB runs equal the official ones bit for bit in fp32, and on the test models every
attack finds exactly the official set of robust points. What differs makes it faster, never
changes a verdict:
- a point leaves the working batch as soon as it is fooled (the official code iterates it to
  the end; every per-point computation is independent of the other points, and all random
  draws of a run happen at its start, so the points that remain follow the same path);
- the clean logits are computed once (the official code recomputes them inside every attack),
  and the final label check runs only on the points an attack claims to have fooled;
- the target classes of APGD-T and FAB-T run together in one batch (rows = point x target)
  while that fits in batch_size: their outcomes are independent (the official code runs them one
  after the other, so the random starts of later targets differ, a sampling-noise difference);
- opt-in, and reported as non-standard: --compile, --bf16.
On the points no attack breaks, the forward and backward passes are the official ones, pass
for pass: the time saved is where points get fooled, or where batching fills an idle device.
Worst case over attacks: each attack runs only on the points still robust; robust accuracy
is counted over all points (a misclassified clean point is never robust).
"""
import argparse
import datetime
import json
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attack

ATTACKS = ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t')
DEFAULT_EPS = {'Linf': 4 / 255, 'L2': 2.0, 'L1': 75.0}


def attack_config(version='standard', norm='Linf', attacks=None, overrides=None):
    """Attack list and hyper-parameters of each version, as the official AutoAttack sets them.
    'custom' keeps the official constructor defaults (e.g. 5 APGD restarts, no largereps);
    `overrides` (e.g. {'apgd_iter': 10}) changes any value, for quick tests only."""
    cfg = dict(apgd_iter=100, apgd_restarts=5, apgd_t_restarts=1, apgd_targets=9, eot_iter=1,
               largereps=False, fab_iter=100, fab_restarts=5, fab_targets=9,
               square_queries=5000, square_p_init=0.8, square_restarts=1)
    if version != 'custom' and attacks is not None:
        raise ValueError("attacks=[...] is only used with version='custom'")
    if version == 'standard':
        attacks = ['apgd-ce', 'apgd-t', 'fab-t', 'square']
        cfg.update(apgd_restarts=1, fab_restarts=1)
        if norm == 'L1':  # eps schedule 3,2,1 x eps, 5 restarts, 5 target classes
            cfg.update(apgd_restarts=5, apgd_targets=5, largereps=True)
    elif version == 'plus':
        attacks = ['apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t']
    elif version == 'rand':  # randomised defences: expectation over 20 draws per step
        attacks = ['apgd-ce', 'apgd-dlr']
        cfg.update(apgd_restarts=1, eot_iter=20)
    elif version != 'custom':
        raise ValueError(f"version must be standard, plus, rand or custom, got {version!r}")
    if version == 'custom' and not attacks:
        raise ValueError("version='custom' needs attacks=[...]")
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}: choose from {', '.join(ATTACKS)}")
    for k, v in (overrides or {}).items():
        if k not in cfg:
            raise ValueError(f"unknown override {k!r}: one of {', '.join(cfg)}")
        cfg[k] = v
    cfg['attacks'] = list(attacks)
    return cfg


# ----------------------------------------------------------------------------- norms, losses
def _flat_norm(t, norm):
    t = t.reshape(t.shape[0], -1)
    return t.abs().max(1)[0] if norm == 'Linf' else (t ** 2).sum(-1).sqrt() if norm == 'L2' \
        else t.abs().sum(-1)


def _normalize(t, norm):
    return t / (_flat_norm(t, norm).view(-1, *[1] * (t.dim() - 1)) + 1e-12)


def _l2(t):  # as the official L2_norm(t, keepdim=True)
    return (t ** 2).view(t.shape[0], -1).sum(-1).sqrt().view(-1, *[1] * (t.dim() - 1))


def _l0(t):
    return (t != 0.).flatten(1).sum(-1)  # (flatten: a batch whose points have all left has 0 rows)


def ce_loss(logits, y, y_target=None):
    return F.cross_entropy(logits, y, reduction='none')


def dlr_loss(logits, y, y_target=None):
    # Difference of Logits Ratio: shift and scale invariant; needs >= 3 classes
    srt, ind = logits.sort(dim=1)
    top_is_y = (ind[:, -1] == y).float()
    u = torch.arange(logits.shape[0])
    return -(logits[u, y] - srt[:, -2] * top_is_y - srt[:, -1] * (1. - top_is_y)) / (
        srt[:, -1] - srt[:, -3] + 1e-12)


def dlr_targeted_loss(logits, y, y_target):
    srt, _ = logits.sort(dim=1)
    u = torch.arange(logits.shape[0])
    return -(logits[u, y] - logits[u, y_target]) / (srt[:, -1] - .5 * (srt[:, -3] + srt[:, -4]) + 1e-12)


LOSSES = {'ce': ce_loss, 'dlr': dlr_loss, 'dlr-targeted': dlr_targeted_loss}


def l1_projection(x, y, eps):
    """delta with ||y + delta||_1 <= eps and x + y + delta in [0, 1], closest to 0 (the official
    L1_projection). Per coordinate the magnitude of y is cut by d = clip(lambda, -u, |y|): at least
    what the box forces (-u), at most |y| (no sign flip). The threshold lambda is found by sorting
    the 2D breakpoints and bisecting on the running L1 mass."""
    shape, n = x.shape, x.shape[0]
    x, y = x.clone().float().view(n, -1), y.clone().float().view(n, -1)
    sigma = y.clone().sign()
    u = torch.min(torch.zeros_like(y), torch.min(1 - x - y, x + y))  # forced cut (<= 0)
    l = -torch.clone(y).abs()
    d = u.clone()
    bs, indbs = torch.sort(-torch.cat((u, l), 1), dim=1)
    bs2 = torch.cat((bs[:, 1:], torch.zeros(n, 1, device=bs.device)), 1)
    size1 = (2 * (indbs < u.shape[1]).float() - 1).cumsum(dim=1)  # active coordinates
    s1 = -u.sum(dim=1)
    c = eps - y.clone().abs().sum(dim=1)
    c2 = (s1 + c < 0).nonzero().squeeze(1)  # still outside the ball after the box cut
    s = s1.unsqueeze(-1) + torch.cumsum((bs2 - bs) * size1, dim=1)
    lb = torch.zeros_like(c2).float()
    ub = torch.ones_like(lb) * (bs.shape[1] - 1)
    for _ in range(math.ceil(math.log2(bs.shape[1]))):
        mid = torch.floor((lb + ub) / 2.)
        below = s[c2, mid.long()] + c[c2] < 0
        lb = torch.where(below, mid, lb)
        ub = torch.where(below, ub, mid)
    lb2 = lb.long()
    alpha = (-s[c2, lb2] - c[c2]) / size1[c2, lb2 + 1] + bs2[c2, lb2]
    d[c2] = -torch.min(torch.max(-u[c2], alpha.unsqueeze(-1)), -l[c2])
    return (sigma * d).view(shape)


# ----------------------------------------------------------------------------- APGD
def _keep_rows(s, keep):
    """Drop rows from every per-row tensor of the attack state s."""
    for name, v in vars(s).items():
        if torch.is_tensor(v):
            setattr(s, name, v[keep])


def _input_grad(model, x_adv, loss_fn, y, y_target, eot_iter):
    """Input gradient of the summed per-point loss (averaged over EOT draws)."""
    x_adv = x_adv.detach().requires_grad_()
    grad = torch.zeros_like(x_adv)
    for _ in range(eot_iter):
        with torch.enable_grad():
            logits = model(x_adv)
            loss_indiv = loss_fn(logits, y, y_target)
            loss = loss_indiv.sum()
        grad += torch.autograd.grad(loss, [x_adv])[0].detach()
    grad /= float(eot_iter)
    return grad, logits.detach(), loss_indiv.detach()


def _apgd_step(s, norm, eps, a, n_fts):
    """Step from x_adv along the gradient, project, then mix in momentum:
    x_adv + a (z - x_adv) + (1 - a) (x_adv - x_adv_old), projected again. L1 moves only the
    top-k gradient coordinates and has no momentum. Float operations as the official code."""
    x, x_adv, view = s.x, s.x_adv, (-1, *[1] * (s.x.dim() - 1))
    grad2 = x_adv - s.x_adv_old
    if norm == 'Linf':
        z = x_adv + s.step_size * torch.sign(s.grad)
        z = torch.clamp(torch.min(torch.max(z, x - eps), x + eps), 0.0, 1.0)
        return torch.clamp(torch.min(torch.max(x_adv + (z - x_adv) * a + grad2 * (1 - a), x - eps), x + eps), 0.0, 1.0)
    if norm == 'L2':
        proj = lambda z: torch.clamp(x + _normalize(z - x, norm) * torch.min(eps * torch.ones_like(x), _l2(z - x)),
                                     0.0, 1.0)
        z = proj(x_adv + s.step_size * _normalize(s.grad, norm))
        return proj(x_adv + (z - x_adv) * a + grad2 * (1 - a))
    grad_topk = s.grad.abs().view(len(x), -1).sort(-1)[0]
    topk_curr = torch.clamp((1. - s.topk) * n_fts, min=0, max=n_fts - 1).long()
    grad_topk = grad_topk[torch.arange(len(x), device=x.device), topk_curr].view(view)
    sparsegrad = s.grad * (s.grad.abs() >= grad_topk).float()
    z = x_adv + s.step_size * sparsegrad.sign() / (sparsegrad.sign().abs().view(len(x), -1).sum(-1).view(view) + 1e-10)
    return x + (z - x) + l1_projection(x, z - x, eps)


def _apgd_checkpoint(s, norm, eps, i, k, rho, alpha, n_fts):
    """Linf/L2: halve the step where the loss rose in at most rho of the last k steps, or where
    the best loss did not improve and the step was not halved last time; L1: reset the step
    where the best point got sparser, else shrink it. Either way restart from the best point."""
    if norm in ('Linf', 'L2'):
        t = torch.zeros(len(s.x), device=s.x.device)
        for c in range(k):  # (i - c - 1 = -1 reads the last, still zero, column: as officially)
            t += (s.loss_steps[:, i - c] > s.loss_steps[:, i - c - 1]).float()
        fl = (t <= k * rho * torch.ones_like(t)).float()
        fl = torch.max(fl, (1. - s.reduced_last_check) * (s.loss_best_last_check >= s.loss_best).float())
        s.reduced_last_check, s.loss_best_last_check = fl.clone(), s.loss_best.clone()
        fl = fl > 0
        s.step_size[fl] /= 2.0
    else:
        sp_curr = _l0(s.x_best - s.x)
        fl = (sp_curr / s.sp_old) < .95
        s.topk, s.sp_old = sp_curr / n_fts / 1.5, sp_curr.clone()
        s.step_size[fl] = alpha * eps
        s.step_size[~fl] /= 1.5
        s.step_size.clamp_(alpha * eps / 10., alpha * eps)
    s.x_adv[fl] = s.x_best[fl].clone()
    s.grad[fl] = s.grad_best[fl].clone()


def apgd(model, x, y, norm, eps, n_iter, loss='ce', y_target=None, x_init=None, eot_iter=1,
         rho=0.75, owner=None, drop=True, warn=None):
    """One APGD run (Croce & Hein 2020): momentum steps; at checkpoints (the first after 22% of
    the iterations, the gap shrinking by 3% down to 6%) the step size is halved where progress
    stalled. Same floating-point operations as the official attack_single_run.
    owner[i] is the point row i attacks (rows of one point with different targets share it);
    with drop=True, once a row is fooled all rows of its point leave the batch.
    Returns per row (fooled, x_found: a misclassified iterate, x_best, loss_best)."""
    n, dev, n_fts = len(x), x.device, math.prod(x.shape[1:])
    loss_fn = LOSSES[loss]
    # the random start is drawn even with x_init: the RNG stream stays the official one
    t = 2 * torch.rand(x.shape).to(dev) - 1 if norm == 'Linf' else torch.randn(x.shape).to(dev)
    if x_init is not None:
        x_adv = x_init.clone()
    elif norm == 'L1':
        x_adv = x + t + l1_projection(x, t, eps)
    else:
        x_adv = x + eps * torch.ones_like(x) * _normalize(t, norm)
    x_adv = x_adv.clamp(0., 1.)
    grad, logits, loss_indiv = _input_grad(model, x_adv, loss_fn, y, y_target, eot_iter)
    n_zero = int((grad.view(n, -1).abs().sum(-1) == 0).sum())
    if warn and loss != 'ce' and n_zero:
        warn(f"{n_zero} points with zero gradient (DLR with the true class third?): "
             "gradient attacks may be unreliable for them")
    alpha = 2. if norm in ('Linf', 'L2') else 1.
    s = SimpleNamespace(  # all per row, so that rows can leave the batch together
        x=x, y=y, yt=y_target, rows=torch.arange(n, device=dev),
        owner=torch.arange(n, device=dev) if owner is None else owner,
        x_adv=x_adv, x_adv_old=x_adv.clone(), x_best=x_adv.clone(), x_best_adv=x_adv.clone(),
        grad=grad, grad_best=grad.clone(), acc=logits.max(1)[1] == y,
        loss_best=loss_indiv.clone(), loss_steps=torch.zeros([n, n_iter], device=dev),
        step_size=alpha * eps * torch.ones([n, *[1] * (x.dim() - 1)], device=dev),
        loss_best_last_check=loss_indiv.clone(), reduced_last_check=torch.ones_like(loss_indiv))
    k, size_decr, n_iter_min = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    if norm == 'L1':  # check the sparsity every 4% of the iterations
        k = max(int(.04 * n_iter), 1)
        s.topk, s.sp_old = (.2 * torch.ones([n], device=dev), n_fts * torch.ones([n], device=dev)) \
            if x_init is None else (_l0(x_adv - x) / n_fts / 1.5, _l0(x_adv - x))
    fooled, x_found = torch.zeros(n, dtype=torch.bool, device=dev), x.clone()
    x_best, loss_best = x.clone(), torch.zeros(n, device=dev)

    def drop_fooled():
        if drop and not s.acc.all():
            out = ~s.acc
            fooled[s.rows[out]], x_found[s.rows[out]] = True, s.x_best_adv[out]
            _keep_rows(s, ~torch.isin(s.owner, s.owner[out]))

    drop_fooled()
    counter3 = 0
    for i in range(n_iter):
        if len(s.x) == 0:
            break
        with torch.no_grad():
            x_new = _apgd_step(s, norm, eps, 0.75 if i > 0 else 1.0, n_fts) + 0.
            s.x_adv_old, s.x_adv = s.x_adv, x_new
        s.grad, logits, loss_indiv = _input_grad(model, s.x_adv, loss_fn, s.y, s.yt, eot_iter)
        pred = logits.max(1)[1] == s.y
        s.acc = torch.min(s.acc, pred)
        s.x_best_adv[~pred] = s.x_adv[~pred] + 0.
        s.loss_steps[:, i] = loss_indiv  # stored before fooled rows leave, read back after
        drop_fooled()
        with torch.no_grad():
            y1 = s.loss_steps[:, i]
            better = y1 > s.loss_best
            s.x_best[better] = s.x_adv[better].clone()
            s.grad_best[better] = s.grad[better].clone()
            s.loss_best[better] = y1[better] + 0
            counter3 += 1
            if counter3 == k:
                _apgd_checkpoint(s, norm, eps, i, k, rho, alpha, n_fts)
                k = max(k - size_decr, n_iter_min) if norm != 'L1' else k
                counter3 = 0
    fooled[s.rows] = ~s.acc
    x_found[s.rows], x_best[s.rows], loss_best[s.rows] = s.x_best_adv, s.x_best, s.loss_best
    return fooled, x_found, x_best, loss_best


def apgd_largereps(model, x, y, eps, n_iter, loss='ce', y_target=None, eot_iter=1, owner=None, warn=None):
    """L1 APGD with `use_largereps`: 3 eps, then 2 eps, then eps, each stage starting from the
    previous stage's best point. Only the last stage can fool a point: its ball is the real one."""
    epss = [3. * eps, 2. * eps, 1. * eps]
    iters = [math.ceil(.3 * n_iter), math.ceil(.3 * n_iter)]  # 31, 31 (float .3*100 > 30), as official
    iters.append(n_iter - sum(iters))
    x_init = x + torch.randn_like(x)
    x_init += l1_projection(x, x_init - x, 1. * float(epss[0]))
    for stage, (e, it) in enumerate(zip(epss, iters)):
        x_init += l1_projection(x, x_init - x, 1. * e)
        fooled, x_found, x_init, _ = apgd(model, x, y, 'L1', e, it, loss, y_target, x_init, eot_iter,
                                          owner=owner, drop=stage == 2, warn=warn)
    return fooled, x_found


def run_restarts_or_targets(one_run, x, y, logits, n_targets, restarts, batch_size):
    """The official loops of perturb(): untargeted, `restarts` runs each on the points still
    robust; targeted, the classes ranked 2nd..(n_targets+1)th by the clean logits. Several
    target classes share one batch (rows = point x target, at most batch_size rows) because
    their outcomes are independent; the official code runs them one after the other."""
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    adv = x.clone()
    order = logits.sort(dim=1)[1]
    jobs = list(range(2, n_targets + 2)) if n_targets else [None]
    while jobs and not fooled.all():
        g = max(1, batch_size // int((~fooled).sum())) if n_targets else 1
        group, jobs = jobs[:g], jobs[g:]
        for r in range(restarts):
            left = (~fooled).nonzero()[:, 0]
            if len(left) == 0:
                break
            rows = left.repeat(len(group))
            tgt = torch.cat([order[left, -t] for t in group]) if n_targets else None
            f, a = one_run(x[rows], y[rows], tgt, rows, r)
            fooled[rows[f]] = True
            adv[rows[f]] = a[f]
    return fooled, adv


# ----------------------------------------------------------------------------- FAB
def _proj_linf(t, w, b):
    """FAB's step: the smallest-Linf move d with w.(t+d) = b and t+d in [0,1] (official
    projection_linf): coordinates move towards the box corner that changes w.t fastest, all by
    the same amount lambda unless the box stops them; lambda by bisection over sorted breakpoints."""
    w, b = w.clone(), b.clone()
    sign = 2 * ((w * t).sum(1) - b >= 0) - 1
    w.mul_(sign.unsqueeze(1))
    b.mul_(sign)
    a = (w < 0).float()                       # corner that decreases w.t
    d = (a - t) * (w != 0).float()            # full move to that corner
    p = a - t * (2 * a - 1)                   # room left before the corner, per coordinate
    indp = torch.argsort(p, dim=1)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    indp2 = indp.flip((1,))
    ws = w.gather(1, indp2)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(-ws * d.gather(1, indp2), dim=1) + b0.unsqueeze(1)
    b2 = sb[:, -1] - s[:, -1] * p.gather(1, indp[:, 0:1]).squeeze(1)
    c_l = b - b2 > 0                          # reached before any coordinate hits the box
    c2 = (b - b0 > 0) & (~c_l)                # reached after some hit it
    lb = torch.zeros(int(c2.sum()), device=t.device)
    ub = torch.full_like(lb, w.shape[1] - 1)
    indp_, sb_, s_, p_, b_ = indp[c2], sb[c2], s[c2], p[c2], b[c2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        mid2 = mid.long().unsqueeze(1)
        indcurr = indp_.gather(1, indp_.size(1) - 1 - mid2)
        b2 = (sb_.gather(1, mid2) - s_.gather(1, mid2) * p_.gather(1, indcurr)).squeeze(1)
        c = b_ - b2 > 0
        lb, ub = torch.where(c, mid, lb), torch.where(c, ub, mid)
    lb = lb.long()
    if c_l.any():
        lmbd = torch.clamp_min((b[c_l] - sb[c_l, -1]) / (-s[c_l, -1]), min=0).unsqueeze(-1)
        d[c_l] = (2 * a[c_l] - 1) * lmbd
    lmbd = torch.clamp_min((b[c2] - sb[c2, lb]) / (-s[c2, lb]), min=0).unsqueeze(-1)
    d[c2] = torch.min(lmbd, d[c2]) * a[c2] + torch.max(-lmbd, d[c2]) * (1 - a[c2])
    return d * (w != 0).float()


def _proj_l2(t, w, b):
    """Smallest-L2 move onto the hyperplane inside the box (official projection_l2): d = -r w
    with coordinates frozen once they hit the box; bisection over the sorted hitting times r."""
    w = w.clone()
    c = (w * t).sum(1) - b
    sign = 2 * (c >= 0) - 1
    w.mul_(sign.unsqueeze(1))
    c.mul_(sign)
    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)  # time to hit the box
    r.masked_fill_(w.abs() < 1e-8, 1e12)
    r[r == -1e12] *= -1
    rs, indr = torch.sort(r, dim=1)
    rs2 = F.pad(rs[:, 1:], (0, 1))
    rs.masked_fill_(rs == 1e12, 0)
    rs2.masked_fill_(rs2 == 1e12, 0)
    w3s = (w ** 2).gather(1, indr)
    w5 = w3s.sum(dim=1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)        # squared weight of the coordinates still free
    d = -(r * w)
    d.mul_((w.abs() > 1e-8).float())
    s = torch.cat((-w5 * rs[:, 0:1], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, 0:1]), 1)
    c4 = s[:, 0] + c < 0                      # no coordinate hits the box: plain projection
    c3 = (d * w).sum(dim=1) + c > 0           # unreachable inside the box: go to the corner
    c2 = ~(c4 | c3)
    lb = torch.zeros(int(c2.sum()), device=t.device)
    ub = torch.full_like(lb, w.shape[1] - 1)
    s_, c_ = s[c2], c[c2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        up = s_.gather(1, mid.long().unsqueeze(1)).squeeze(1) + c_ > 0
        lb, ub = torch.where(up, mid, lb), torch.where(up, ub, mid)
    lb = lb.long()
    if c4.any():
        alpha = c[c4] / w5[c4].squeeze(-1)
        d[c4] = -alpha.unsqueeze(-1) * w[c4]
    if c2.any():
        alpha = (s[c2, lb] + c[c2]) / ws[c2, lb] + rs[c2, lb]
        alpha[ws[c2, lb] == 0] = 0
        c5 = (alpha.unsqueeze(-1) > r[c2]).float()
        d[c2] = d[c2] * c5 - alpha.unsqueeze(-1) * w[c2] * (1 - c5)
    return d * (w.abs() > 1e-8).float()


def _proj_l1(t, w, b):
    """Smallest-L1 move onto the hyperplane inside the box (official projection_l1): spend the
    budget on the coordinates with the largest |w| first, each up to the box."""
    w = w.clone()
    c = (w * t).sum(1) - b
    sign = 2 * (c >= 0) - 1
    w.mul_(sign.unsqueeze(1))
    c.mul_(sign)
    r = (1 / w).abs().clamp_max(1e12)         # cost per unit of w.t, per coordinate
    indr = torch.argsort(r, dim=1)
    indr_rev = torch.argsort(indr)
    d = (-t + (w < 0).float()) * (w != 0).float()
    ds = torch.min(-w * t, w * (1 - t)).gather(1, indr)
    s = torch.cumsum(torch.cat((c.unsqueeze(-1), ds), 1), dim=1)
    c2 = s[:, -1] < 0                         # reachable inside the box
    lb = torch.zeros(int(c2.sum()), device=t.device)
    ub = torch.full_like(lb, s.shape[1])
    s_ = s[c2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        up = s_.gather(1, mid.long().unsqueeze(1)).squeeze(1) > 0
        lb, ub = torch.where(up, mid, lb), torch.where(up, ub, mid)
    lb2 = lb.long()
    if c2.any():
        indr = indr[c2].gather(1, lb2.unsqueeze(1)).squeeze(1)
        u = torch.arange(0, w.shape[0], device=t.device).unsqueeze(1)
        u2 = torch.arange(0, w.shape[1], device=t.device, dtype=torch.float).unsqueeze(0)
        alpha = -s[c2, lb2] / w[c2, indr]
        c5 = u2 < lb.unsqueeze(-1)
        u3 = c5[u[:c5.shape[0]], indr_rev[c2]]  # coordinates cheaper than the last one: full move
        d[c2] = d[c2] * u3.float()
        d[c2, indr] = alpha
    return d * (w.abs() > 1e-8).float()


FAB_PROJ = {'Linf': _proj_linf, 'L2': _proj_l2, 'L1': _proj_l1}


def _fab_grads(model, x1, y, y_target):
    """Differences (to the true class) of the logits at x1 and of their input gradients:
    against the target only (FAB-T), or against every class, one backward each (FAB)."""
    u = torch.arange(len(x1))
    im = x1.clone().requires_grad_()
    with torch.enable_grad():
        logits = model(im)
        if y_target is not None:
            diffy = -(logits[u, y] - logits[u, y_target])
            g = torch.autograd.grad(diffy.sum(), [im])[0]
            return diffy.detach().unsqueeze(1), g.detach().unsqueeze(1)
        g2 = torch.stack([torch.autograd.grad(logits[:, k].sum(), [im], retain_graph=True)[0]
                          for k in range(logits.shape[1])], 1)
    logits = logits.detach()
    df = logits - logits[u, y].unsqueeze(1)
    dg = g2 - g2[u, y].unsqueeze(1)
    df[u, y] = 1e10
    return df, dg


def fab(model, x, y, norm, eps, n_iter, y_target=None, rand_start=False, owner=None, drop=True,
        alpha_max=0.1, eta=1.05, beta=0.9):
    """One FAB run (Croce & Hein 2020): step to the linearised decision boundary (projected
    into the box), biased back towards the clean point; once adversarial, remember it and pull
    back by beta. A point is fooled when its smallest adversarial is within eps, which is final:
    it leaves the batch then. Returns (fooled, adversarial) per row. Clean points must be correct."""
    n, ndims = len(x), x.dim() - 1
    dev, view = x.device, (-1, *[1] * ndims)
    im2, x0 = x.clone(), x.clone().reshape(n, -1)
    res2 = 1e10 * torch.ones(n, device=dev)
    x1 = im2.clone()
    if rand_start:  # a random point at half the eps radius
        r = torch.min(res2, eps * torch.ones(n, device=dev)).reshape(view)
        t = 2 * torch.rand(x1.shape).to(dev) - 1 if norm == 'Linf' else torch.randn(x1.shape).to(dev)
        x1 = (im2 + r * t / _flat_norm(t, norm).reshape(view) * .5).clamp(0.0, 1.0)
    out_fooled, out_adv = torch.zeros(n, dtype=torch.bool, device=dev), x.clone()
    s = SimpleNamespace(rows=torch.arange(n, device=dev), owner=torch.arange(n, device=dev) if owner is None
                        else owner, x1=x1, im2=im2, x0=x0, y=y, yt=y_target, res2=res2, adv=x.clone())
    for it in range(n_iter):
        if len(s.x1) == 0:
            break
        df, dg = _fab_grads(model, s.x1, s.y, s.yt)
        with torch.no_grad():
            m, u1 = len(s.x1), torch.arange(len(s.x1))
            dgf = dg.reshape(m, dg.shape[1], -1)
            scale = dgf.abs().sum(-1) if norm == 'Linf' else (dgf ** 2).sum(-1).sqrt() if norm == 'L2' \
                else dgf.abs().max(2)[0]
            ind = (df.abs() / (1e-12 + scale)).min(dim=1)[1]  # the closest linearised boundary
            dg2 = dg[u1, ind]
            b = -df[u1, ind] + (dg2 * s.x1).reshape(m, -1).sum(dim=-1)
            w = dg2.reshape(m, -1)
            d3 = FAB_PROJ[norm](torch.cat((s.x1.reshape(m, -1), s.x0), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
            d1, d2 = d3[:m].reshape(s.x1.shape), d3[-m:].reshape(s.x1.shape)
            a0 = _flat_norm(d3, norm).view(-1, *[1] * ndims)
            a0 = torch.max(a0, 1e-8 * torch.ones(a0.shape, device=dev))
            a1, a2 = a0[:m], a0[-m:]
            alpha = torch.min(torch.max(a1 / (a1 + a2), torch.zeros(a1.shape, device=dev)),
                              alpha_max * torch.ones(a1.shape, device=dev))
            s.x1 = ((s.x1 + eta * d1) * (1 - alpha) + (s.im2 + d2 * eta) * alpha).clamp(0.0, 1.0)
            # (a separate forward, as officially: reusing the next gradient's forward costs more,
            # the overshooting iterate is adversarial in most steps and is then pulled back)
            is_adv = model(s.x1).max(1)[1] != s.y
            if not is_adv.any():
                continue
            t = _flat_norm(s.x1[is_adv] - s.im2[is_adv], norm)
            better = is_adv.clone()
            better[is_adv] = t < s.res2[is_adv]
            s.adv[better] = s.x1[better]
            s.res2[is_adv] = torch.min(t, s.res2[is_adv])
            s.x1[is_adv] = s.im2[is_adv] + (s.x1[is_adv] - s.im2[is_adv]) * beta
            done = s.res2 <= eps
            if drop and done.any():
                out_fooled[s.rows[done]] = True
                out_adv[s.rows[done]] = s.adv[done]
                _keep_rows(s, ~torch.isin(s.owner, s.owner[done]))
    out_fooled[s.rows] = s.res2 <= eps
    out_adv[s.rows] = s.adv
    return out_fooled, out_adv


# ----------------------------------------------------------------------------- Square
def _rand_sign(shape, dev):
    return torch.sign(2 * torch.rand(shape).to(dev) - 1)


def _rand_int(high):
    return int((0 + high * torch.rand([1])).long())


def _square_p(p_init, it):
    """Fraction of pixels a square covers at query `it` (official schedule, not rescaled)."""
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                       (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _square_eta(s, norm, dev):
    """The L2/L1 square's pattern: two opposite-signed halves, each a stack of nested
    rectangles weighted 1/k^2 (L2) or 1/k^4 (L1); randomly transposed."""
    def rects(hh, ww):
        delta = torch.zeros([hh, ww], device=dev)
        c0, c1 = hh // 2, ww // 2
        for k in range(max(hh // 2 + 1, ww // 2 + 1)):
            delta[max(c0, 0):min(c0 + (2 * k + 1), hh), max(0, c1):min(c1 + (2 * k + 1), ww)] += \
                1.0 / (torch.Tensor([k + 1]).view(1, 1).to(dev) ** (2 if norm == 'L2' else 4))
            c0, c1 = c0 - 1, c1 - 1
        return delta / ((delta ** 2).sum(dim=(0, 1), keepdim=True).sqrt() if norm == 'L2'
                        else delta.abs().sum(dim=(), keepdim=True))
    delta = torch.zeros([s, s], device=dev)
    delta[:s // 2] = rects(s // 2, s)
    delta[s // 2:] = -1. * rects(s - s // 2, s)
    delta /= (delta ** 2).sum(dim=(0, 1), keepdim=True).sqrt() if norm == 'L2' \
        else delta.abs().sum(dim=(), keepdim=True)
    if torch.rand([1]) > 0.5:
        delta = delta.permute([1, 0])
    return delta


def _margin(model, x, y):
    logits = model(x).clone()
    u = torch.arange(len(x))
    y_corr = logits[u, y].clone()
    logits[u, y] = -float('inf')
    return y_corr - logits.max(dim=-1)[0]


@torch.no_grad()
def square(model, x, y, norm, eps, n_queries, p_init=0.8):
    """Square Attack (Andriushchenko et al. 2020): random search with square-shaped updates
    on the margin loss; a point leaves once its margin is <= 0 (as in the official code).
    Returns (fooled, x_best): fooled by margin, to be confirmed by the caller's label check."""
    n, c, h, w = x.shape
    n_features, dev = c * h * w, x.device
    if norm == 'Linf':  # vertical stripes of +-eps
        x_best = torch.clamp(x + eps * _rand_sign([n, c, 1, w], dev), 0., 1.)
    else:  # a grid of 5x5 tiles, each the eta pattern with a random sign per channel
        delta, s = torch.zeros_like(x), h // 5
        vh = (h - s * 5) // 2
        for _ in range(h // s):
            vw = (h - s * 5) // 2
            for _ in range(w // s):
                delta[:, :, vh:vh + s, vw:vw + s] += _square_eta(s, norm, dev).view(1, 1, s, s) * \
                    _rand_sign([n, c, 1, 1], dev)
                vw += s
            vh += s
        x_best = torch.clamp(x + _normalize(delta, norm) * eps, 0., 1.) if norm == 'L2' else \
            x + delta + l1_projection(x, delta, eps * (1. - 1e-6))
    margin_min = _margin(model, x_best, y)
    for i_iter in range(n_queries):
        idx = (margin_min > 0.0).nonzero()[:, 0]
        if len(idx) == 0:
            break
        x_curr, x_best_curr, y_curr = x[idx], x_best[idx], y[idx]
        p = _square_p(p_init, i_iter)
        if norm == 'Linf':  # one square of side s, +-2eps per channel, then clip to the ball
            s = min(max(int(round(math.sqrt(p * n_features / c))), 1), min(h, w))
            vh, vw = _rand_int(h - s), _rand_int(w - s)
            new_deltas = torch.zeros([c, h, w], device=dev)
            new_deltas[:, vh:vh + s, vw:vw + s] = 2. * eps * _rand_sign([c, 1, 1], dev)
            x_new = torch.min(torch.max(x_best_curr + new_deltas, x_curr - eps), x_curr + eps)
            x_new = torch.clamp(x_new, 0., 1.)
        else:  # move the mass of window 2 into window 1 (odd side s >= 3), keep the norm
            s = max(int(round(math.sqrt(p * n_features / c))), 3)
            s = min(s + 1 if s % 2 == 0 else s, min(h, w))
            delta_curr = x_best_curr - x_curr
            vh, vw = _rand_int(h - s), _rand_int(w - s)
            mask1 = torch.zeros_like(x_curr)
            mask1[:, :, vh:vh + s, vw:vw + s] = 1.0
            win1 = delta_curr[:, :, vh:vh + s, vw:vw + s]
            vh2, vw2 = _rand_int(h - s), _rand_int(w - s)
            mask2 = torch.zeros_like(x_curr)
            mask2[:, :, vh2:vh2 + s, vw2:vw2 + s] = 1.
            norms_image = _flat_norm(x_best_curr - x_curr, norm).view(-1, 1, 1, 1)
            both = delta_curr * torch.max(mask1, mask2)
            new_deltas = torch.ones([len(idx), c, s, s], device=dev)
            new_deltas *= (_square_eta(s, norm, dev).view(1, 1, s, s) * _rand_sign([len(idx), c, 1, 1], dev))
            if norm == 'L2':
                norms_windows = (both ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
                new_deltas += win1 / (1e-12 + (win1 ** 2).sum(dim=(-2, -1), keepdim=True).sqrt())
                new_deltas = new_deltas / (1e-12 + (new_deltas ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()) * (
                    torch.max((eps * torch.ones_like(new_deltas)) ** 2 - norms_image ** 2,
                              torch.zeros_like(new_deltas)) / c + norms_windows ** 2).sqrt()
            else:
                norms_windows = both.abs().sum(dim=(-2, -1), keepdim=True)
                new_deltas += win1 / (1e-12 + win1.abs().sum(dim=(-2, -1), keepdim=True))
                new_deltas = new_deltas / (1e-12 + new_deltas.abs().sum(dim=(-2, -1), keepdim=True)) * (
                    torch.max(eps * torch.ones_like(norms_image) - norms_image,
                              torch.zeros_like(norms_image)) / c + norms_windows) * c
            delta_curr[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0.
            delta_curr[:, :, vh:vh + s, vw:vw + s] = new_deltas + 0
            x_new = torch.clamp(x_curr + _normalize(delta_curr, norm) * eps, 0., 1.) if norm == 'L2' else \
                x_curr + delta_curr + l1_projection(x_curr, delta_curr, eps * (1. - 1e-6))
        margin = _margin(model, x_new, y_curr)
        # keep the candidate if it lowers the margin (or misclassifies)
        better = (margin < margin_min[idx]) | (margin <= 0.)
        margin_min[idx] = torch.where(better, margin, margin_min[idx])
        x_best[idx] = torch.where(better.view(-1, 1, 1, 1), x_new, x_best_curr)
    return margin_min <= 0., x_best


# ----------------------------------------------------------------------------- one attack on one batch
def run_attack(name, model, x, y, logits, cfg, norm, eps, batch_size, warn=None):
    """Run attack `name` on a batch of correctly classified points. Returns (fooled, x_adv)."""
    if name in ('apgd-ce', 'apgd-dlr', 'apgd-t'):
        loss = {'apgd-ce': 'ce', 'apgd-dlr': 'dlr', 'apgd-t': 'dlr-targeted'}[name]

        def one_run(xr, yr, tr, owner, restart):
            if cfg['largereps']:
                return apgd_largereps(model, xr, yr, eps, cfg['apgd_iter'], loss, tr, cfg['eot_iter'], owner, warn)
            return apgd(model, xr, yr, norm, eps, cfg['apgd_iter'], loss, tr, eot_iter=cfg['eot_iter'],
                        owner=owner, warn=warn)[:2]
        targeted = name == 'apgd-t'
        return run_restarts_or_targets(one_run, x, y, logits, cfg['apgd_targets'] if targeted else 0,
                                       cfg['apgd_t_restarts' if targeted else 'apgd_restarts'], batch_size)
    if name in ('fab', 'fab-t'):
        def one_run(xr, yr, tr, owner, restart):
            return fab(model, xr, yr, norm, eps, cfg['fab_iter'], tr, rand_start=restart > 0, owner=owner)
        targeted = name == 'fab-t'
        return run_restarts_or_targets(one_run, x, y, logits, cfg['fab_targets'] if targeted else 0,
                                       1 if targeted else cfg['fab_restarts'], batch_size)
    fooled, adv = torch.zeros(len(x), dtype=torch.bool, device=x.device), x.clone()
    for _ in range(cfg['square_restarts']):
        left = (~fooled).nonzero()[:, 0]
        f, a = square(model, x[left], y[left], norm, eps, cfg['square_queries'], cfg['square_p_init'])
        fooled[left[f]], adv[left[f]] = True, a[f]
    return fooled, adv


# ----------------------------------------------------------------------------- checks
def check_model(model, x, y, cfg, version, log):
    """The official sanity checks (pyautoattack/checks.py); they warn, never stop."""
    warnings = []

    def warn(msg):
        warnings.append(msg)
        log('WARNING: ' + msg)
    with torch.no_grad():
        outs = [model(x) for _ in range(5)]
    n_correct = {int((o.max(1)[1] == y).sum()) for o in outs}
    unit = [o / (_l2(o) + 1e-10) for o in outs]
    max_diff = max(_flat_norm(a - b, 'L2').max().item() for i, a in enumerate(unit) for b in unit[i + 1:])
    if (len(n_correct) > 1 or max_diff > 1e-4) and version != 'rand':
        warn("the model's output is not deterministic (a randomised defence?): the numbers below "
             "do NOT measure its robustness; evaluate it with version='rand' (--version rand)")
    o = outs[0]
    if o.max() < 1. + 1e-5 and o.min() > -1e-5 and ((o.sum(-1) - 1.).abs() < 1e-5).all():
        warn("the output looks like probabilities: AutoAttack needs logits (drop the softmax)")
    calls = []  # a forward pass that calls autograd hints at a dynamic (test-time) defence

    def tracer(frame, event, arg):
        if event == 'call' and frame.f_code.co_name in ('grad', 'backward', '_make_grads'):
            calls.append(frame.f_code.co_name)
    sys.settrace(tracer)
    try:
        getattr(model, '_orig_mod', model)(x[:2])
    finally:
        sys.settrace(None)
    if calls:
        warn("the forward pass computes gradients (a dynamic defence?): AutoAttack may not suffice")
    n_cls, atk = o.shape[-1], cfg['attacks']
    impossible = [a for a in atk if (a == 'apgd-dlr' and n_cls < 3) or (a == 'apgd-t' and n_cls < 4)]
    if impossible:  # (the official code warns, then fails inside the attack)
        warn(f"{n_cls} classes: the DLR loss needs >= 3 classes and its targeted form >= 4: "
             f"skipping {', '.join(impossible)}")
        cfg['attacks'] = [a for a in atk if a not in impossible]
    for a in ('apgd', 'fab'):
        if f'{a}-t' in atk and cfg[f'{a}_targets'] + 1 > n_cls:
            warn(f"{a.upper()}-T asks for {cfg[f'{a}_targets']} target classes, only {n_cls - 1} exist: using those")
            cfg[f'{a}_targets'] = n_cls - 1
    return warnings, n_cls


# ----------------------------------------------------------------------------- state, ranks, memory
def _save_atomic(obj, path):
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save(obj, tmp)
    os.replace(tmp, path)  # an interruption never leaves a half-written file


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# Every collective of an evaluation waits for the slowest rank's share of the attack work: on ViT-H/g in
# fp32 that is hours more than the others' (a few robust points more get APGD-T, FAB-T and Square), far
# past NCCL's 10 minutes or any process-group timeout, whose watchdog would abort the run. So the ranks
# meet only on a gloo group of their own whose timeout is this long, created at the start while all
# ranks are there; the default group's timeout (--dist_timeout_s) then only covers the start.
PATIENT_TIMEOUT = datetime.timedelta(days=30)
_patient = {}


def _patient_group():
    """The gloo group for the ranks' meetings (None in a single process); all ranks must first ask
    for it at the same point, before any attack work."""
    if _rank_world()[1] == 1:
        return None
    if _patient.get('world') is not dist.group.WORLD:  # a new default group (another run in this process)
        _patient.update(world=dist.group.WORLD, group=dist.new_group(backend='gloo', timeout=PATIENT_TIMEOUT))
    return _patient['group']


def _from_rank0(make):
    """make() run on rank 0 only, its result sent to every rank."""
    rank, world = _rank_world()
    if world == 1:
        return make()
    box = [make() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_patient_group())
    return box[0]


def halve_on_oom(work, bs, device, halved):
    """work(bs) at batch size bs; an out-of-memory error halves bs and runs work(bs) again on the same
    points, down to 1. halved(old, new) is told each time. Returns (work's result, the batch size used)."""
    while True:
        try:
            return work(bs), bs
        except torch.OutOfMemoryError:
            pass  # handled below, outside the except clause, whose traceback keeps the batch's tensors alive
        if bs == 1:
            raise SystemExit(f"error: out of memory on {device} with one image per batch: free the device of "
                             "other processes, or use one with more memory")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        halved(bs, bs // 2)
        bs //= 2


def evaluate(model, x, y, norm='Linf', eps=4 / 255, version='standard', attacks=None, batch_size=250,
             seed=0, state_path=None, log=print, overrides=None, device=None, gather_adv=True):
    """AutoAttack of `model` (eval mode, [0,1] inputs, returns logits) on images x, labels y.
    Points are processed in batches of batch_size (per attack, the points still robust, in
    order, as the official code does). Under torch.distributed, rank r evaluates the points
    r, r + world, ... alone, from start to end, as the official multi-GPU AdvXL evaluation
    does: its verdicts are exactly those of a single process given x[r::world]. An out-of-memory
    error halves the batch size for the rest of the evaluation and reruns the batch it hit (the
    batches done before keep their verdicts: a run whose first forward pass fails at batch size
    B is a run at B // 2). With state_path (one file per rank), progress is saved after every
    batch of every attack and a rerun resumes exactly where it stopped.
    Returns clean_acc, robust_acc, per_attack {attack: cumulative robust acc} (percent),
    the exact counts, per-point `robust` verdicts, and x_adv (x where no attack succeeded).
    gather_adv=False: under torch.distributed, x_adv holds only this rank's adversarial images
    (no all-gather of every image over the network when nobody looks at them)."""
    cfg = attack_config(version, norm, attacks, overrides)
    rank, world = _rank_world()
    group = _patient_group()  # made now, while every rank is here
    say = log if rank == 0 else (lambda *a, **k: None)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else x.device
    n_all, t0 = len(x), time.time()
    assert x.min() >= 0 and x.max() <= 1, "inputs must be [0,1] images (normalise inside the model)"
    # A fixed shard per rank for the whole run, never re-dealt between attacks: re-dealing the points
    # still robust would make every rank wait, after every attack, for the one whose share ran longest
    # (the batches that meet robust points run all four attacks); here each rank runs at its own pace.
    x_all = x
    x, y = (x[rank::world], y[rank::world]) if world > 1 else (x, y)
    n = len(x)

    # state: what is done, and the adversarial examples found (one small file per batch)
    pixels = x.reshape(-1)[::1009]  # cheap, position-sensitive fingerprints of the data
    sig = dict(norm=norm, eps=float(eps), version=version, cfg=dict(cfg), seed=seed, n=n, rank=rank, world=world,
               labels=int((y.long().cpu() * torch.arange(1, n + 1)).sum()),
               images=float((pixels.double() * torch.arange(1, len(pixels) + 1, device=x.device)).sum()))
    if state_path is not None and world > 1:
        state_path = f'{state_path}.rank{rank}'
    if state_path is not None and os.path.exists(state_path):
        st = torch.load(state_path, weights_only=True)
        if st['sig'] != sig:
            raise ValueError(f"state file {state_path} belongs to another evaluation "
                             f"({st['sig']}); delete it or pass another --state_path")
        say(f"resuming from {state_path}: {st['attack_i']} attack(s) done, {st['batches']} batch(es) of the "
            f"next, batch size {st['bs']}")
    else:  # pos: how many of the current attack's points are done (its batches run in order)
        st = dict(sig=sig, logits=None, robust=None, attack_i=0, start=None, pos=0, batches=0, counts={},
                  adv_files=[], bs=batch_size)
    found = [torch.load(f, weights_only=True) for f in st['adv_files']]  # [{idx, adv}]

    def save():
        if state_path is not None:
            _save_atomic(st, state_path)

    def halved(old, new):  # sticky: the rest of the run, and a resumed one, keep the smaller size
        st['bs'] = new
        save()
        (log if rank == 0 else print)(f"{f'rank {rank}: ' if world > 1 else ''}out of memory at batch size "
                                      f"{old}: {new} from here on (--bs {new} starts there)")

    def batch_of(work):
        out, st['bs'] = halve_on_oom(work, st['bs'], device, halved)
        return out

    def keep_adv(idx, adv, tag):
        found.append(dict(idx=idx.cpu(), adv=adv.cpu()))
        if state_path is not None:
            os.makedirs(state_path + '.adv', exist_ok=True)
            f = os.path.join(state_path + '.adv', tag + '.pt')
            _save_atomic(found[-1], f)
            st['adv_files'].append(f)

    def checked(bs):
        c = dict(cfg)  # check_model adapts the attack list to the classes; a failed try leaves cfg as it was
        return check_model(model, x[:bs].to(device), y[:bs].to(device), c, version, say) + (c,)
    warnings, n_cls, cfg = batch_of(checked) if n else ([], 1, cfg)  # (more ranks than points: none here)

    def warn(msg):
        warnings.append(msg)
        say('WARNING: ' + msg)
    say(f"AutoAttack {version} ({', '.join(cfg['attacks'])}), {norm} eps {eps:.5g}, {n_all} points"
        f"{f' ({n} on each of {world} ranks)' if world > 1 else ''}, seed {seed}")
    shard = ' on this rank' if world > 1 else ''

    if st['robust'] is None:  # clean pass; the logits are kept for APGD-T / FAB-T's targets
        logits, pos = torch.zeros(n, n_cls), 0
        while pos < n:
            with torch.no_grad():
                out = batch_of(lambda bs: model(x[pos:pos + bs].to(device)).float().cpu())
            logits[pos:pos + len(out)], pos = out, pos + len(out)
        st['logits'], st['robust'] = logits, logits.max(1)[1] == y.cpu()
        st['counts']['clean'] = int(st['robust'].sum())
        save()
    robust, logits = st['robust'], st['logits']
    say(f"clean: {100 * st['counts']['clean'] / max(n, 1):.2f}% ({st['counts']['clean']}/{n}){shard}")

    def attack_batch(name, idx, bs):
        b = idx[st['pos']:st['pos'] + bs]
        xb, yb = x[b].to(device), y[b].to(device)
        torch.manual_seed(seed)  # as official: the same seed for every attack and batch
        fooled, adv = run_attack(name, model, xb, yb, logits[b].to(device), cfg, norm, eps, bs, warn=warn)
        if fooled.any():  # confirm with a fresh forward pass, as the official code does
            with torch.no_grad():
                fooled[fooled.clone()] = model(adv[fooled]).max(1)[1] != yb[fooled]
        return b, fooled.cpu(), adv[fooled]

    elapsed = OrderedDict()  # seconds since the start of this call, after each attack it ran
    for ai, name in enumerate(cfg['attacks']):
        if ai < st['attack_i']:
            continue
        if st['start'] is None:
            st['start'], st['pos'], st['batches'] = robust.clone(), 0, 0
        idx = st['start'].nonzero()[:, 0]
        ta = time.time()
        while st['pos'] < len(idx):
            b, fooled, adv = batch_of(lambda bs: attack_batch(name, idx, bs))
            robust[b[fooled]] = False
            if fooled.any():
                keep_adv(b[fooled], adv, f"{ai}-{st['pos']}")
            st['pos'], st['batches'] = st['pos'] + len(b), st['batches'] + 1
            save()
            say(f"{name}: batch {st['batches']}/{st['batches'] + math.ceil((len(idx) - st['pos']) / st['bs'])}, "
                f"{int(fooled.sum())}/{len(b)} fooled, {int(robust[idx].sum())} of this attack's {len(idx)} points "
                f"left{shard}, {time.time() - ta:.1f} s")
        st['counts'][name], st['attack_i'], st['start'] = int(robust.sum()), ai + 1, None
        elapsed[name] = time.time() - t0
        save()
        say(f"robust accuracy after {name.upper()}: {100 * st['counts'][name] / max(n, 1):.2f}% "
            f"({st['counts'][name]}/{n}){shard}, {time.time() - ta:.1f} s (total {time.time() - t0:.1f} s)")

    counts, robust_all, batch_sizes = dict(st['counts']), robust.clone(), [st['bs']]
    if world > 1:  # the ranks' one meeting: each waits here, patiently, for the others' last attack
        every = [None] * world
        dist.all_gather_object(every, dict(counts=counts, robust=robust, bs=st['bs'], warnings=warnings,
                                           found=found if gather_adv else []), group=group)
        counts = {k: sum(e['counts'][k] for e in every) for k in counts}
        robust_all = torch.zeros(n_all, dtype=torch.bool)
        for r, e in enumerate(every):
            robust_all[r::world] = e['robust']
        batch_sizes = [e['bs'] for e in every]
        warnings += [w for e in every for w in e['warnings'] if w not in warnings]
        found = [dict(f, idx=f['idx'] * world + r) for r, e in enumerate(every) for f in e['found']] \
            if gather_adv else [dict(f, idx=f['idx'] * world + rank) for f in found]
    per_attack = OrderedDict((a, 100 * counts[a] / n_all) for a in cfg['attacks'])
    others = [v for k, v in per_attack.items() if k != 'square']
    if 'square' in per_attack and others and per_attack['square'] < min(others) - 0.2:
        # official check_square_sr: a black-box attack beating the gradient attacks
        warn("Square lowered the robust accuracy beyond the gradient attacks (gradient masking?): "
             "consider more Square queries/restarts or an adaptive attack")
    x_adv = x_all.clone()
    for f in found:
        x_adv[f['idx'].to(x_adv.device)] = f['adv'].to(x_adv.device, x_adv.dtype)
    n_robust = int(robust_all.sum())
    res = dict(clean_acc=100 * counts['clean'] / n_all, robust_acc=100 * n_robust / n_all,
               per_attack=per_attack, x_adv=x_adv, n=n_all, n_clean=counts['clean'], n_robust=n_robust,
               counts=counts, robust=robust_all, norm=norm, eps=float(eps), version=version,
               attacks=cfg['attacks'], seed=seed, warnings=warnings, time_s=time.time() - t0, elapsed_s=elapsed,
               batch_sizes=batch_sizes)
    say(f"robust accuracy: {res['robust_acc']:.2f}% ({n_robust}/{n_all})" +
        (f"  [{len(warnings)} WARNING(S) above: read them before using this number]" if warnings else ''))
    return res


# ----------------------------------------------------------------------------- model, data, batch
def load_model(path, arch=None, classnames=None, device='cpu'):
    """An eval-mode, frozen model on `device` taking [0,1] images: this project's checkpoint (a
    file or a run's out_dir) or a timm / official AdvXL state dict (arch names the preset when
    the file does not say). A tower trained on web data, or with TeCoA / FARE, becomes its
    zero-shot classifier: the one that run evaluated with, stored in its checkpoint, or for an
    older checkpoint rebuilt as train.py built it. An open_clip model spec ('ViT-B-32/openai',
    'ViT-L-14-quickgelu:/path/weights.bin', see clip_head.parse_open_clip_spec) becomes its own
    zero-shot classifier with CLIP's 80 templates over `classnames` (default: ImageNet's), CLIP's
    mean/std inside. A text tower runs on `device`, on rank 0 only (the others get its classifier)."""
    import model as model_lib
    from checkpoint import read_checkpoint
    import clip_head
    if clip_head.is_open_clip_spec(path):
        vit, tower = clip_head.load_open_clip(path, text=_rank_world()[0] == 0, device=device)
        m = clip_head.ZeroShotClassifier(vit, _from_rank0(
            lambda: clip_head.zeroshot_weights(tower, classnames).float().cpu()))
        m.config = vit.config
        return m.to(device).eval().requires_grad_(False)
    m = model_lib.model_from_file(path, arch)
    ckpt = read_checkpoint(path)
    cfg = ckpt.get('config') or {}
    if clip_head.is_clip_run(cfg):
        weights = ckpt.get('zeroshot_weights')
        if weights is None:  # written before checkpoints held it
            weights = _from_rank0(lambda: training_zeroshot_weights(cfg, device))
        m = clip_head.ZeroShotClassifier(m, weights)
        m.config = m.image_model.config
    return m.to(device).eval().requires_grad_(False)


def training_zeroshot_weights(cfg, device='cpu'):
    """The zero-shot classifier (fp32, CPU) train.py builds for a run's config: the same text tower
    with the same seed (a random tower) and precision, class names and prompts; encoded on `device`."""
    import clip_head
    import data
    import demo_data
    tower = clip_head.load_text_tower(cfg['text_tower'], cfg['text_pretrained'] or None, device,
                                      precision='bf16' if cfg.get('dtype') == 'bfloat16' else 'fp32',
                                      seed=cfg.get('text_seed', cfg['seed']))
    val = cfg['val_data'] or f'{demo_data.DEMO_ROOT}/val'  # data='demo' leaves it empty
    classes = clip_head.imagenet_classnames() if cfg['num_classes'] == 1000 else data.class_names(val)
    return clip_head.zeroshot_weights(tower, classes, list(cfg['prompt_templates']) or None).float().cpu()


def model_args_of(path, arch=None):
    """The image model's architecture (its config as a dict) read off the file or the open_clip
    config, without building the model: for the memory plan and --dry_run."""
    from dataclasses import asdict
    import model as model_lib
    from checkpoint import read_checkpoint
    import clip_head
    if clip_head.is_open_clip_spec(path):
        return asdict(clip_head.open_clip_tower_config(path))
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and 'model_args' in ckpt:
        return dict(ckpt['model_args'])
    return asdict(model_lib.config_from_timm_state_dict(ckpt, arch))


def model_args_desc(model_args, img_size):
    import model as model_lib
    with torch.device('meta'):  # no weights: only the description
        return model_lib.build_model(dict(model_args, img_size=img_size)).describe()


def parse_eps(s):
    num, _, den = str(s).partition('/')
    return float(num) / float(den) if den else float(num)


def load_demo_val(img_size, n_ex, decode=True):
    """The embedded demo's val split (32x32 PNGs), at the model's resolution; a fixed seeded
    subset when n_ex is smaller (the folders are class-sorted), as data.val_loader picks it.
    decode=False: the labels and description only (x is None; y too before the demo exists:
    a dry run makes no data)."""
    import demo_data
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    if not decode and not os.path.isfile(os.path.join(demo_data.DEMO_ROOT, 'DONE')):
        return None, None, f"demo val (the first {n_ex} of a seeded order; made on first use)"
    tf = [T.ToTensor()] if img_size == 32 else [T.Resize(img_size, antialias=True), T.ToTensor()]
    ds = ImageFolder(os.path.join(demo_data.ensure_demo(), 'val'), T.Compose(tf))
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n_ex].sort().values
    ys = torch.tensor([ds.targets[int(i)] for i in keep])
    xs = torch.stack([ds[int(i)][0] for i in keep]) if decode else None
    return xs, ys, f"demo val ({len(keep)} of {len(ds)})"


def load_imagenet_val(root, img_size, n_ex, crop_pct, interpolation, decode=True):
    """ImageNet val: RobustBench's fixed 5000-image list (same order; labels = index of the
    sorted wnid) for n_ex <= 5000, else the whole val set sorted by path. decode=False: the
    files are checked, not read (x is None)."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    import data
    val = os.path.join(root, 'val') if os.path.isdir(os.path.join(root, 'val')) else root
    if not os.path.isdir(val):
        raise SystemExit(f"error: no ImageNet validation folder at {val}: pass --data DIR where DIR/val/<wnid>/"
                         "ILSVRC2012_val_*.JPEG (or DIR/<wnid>/...) exists, or omit --data for the demo set")
    assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
    wnid_to_label = json.load(open(os.path.join(assets, 'imagenet_class_to_id_map.json')))
    if n_ex <= 5000:
        files = open(os.path.join(assets, 'imagenet_test_image_ids.txt')).read().split()[:n_ex]
    else:
        files = sorted(f'{w}/{f}' for w in os.listdir(val) if w in wnid_to_label
                       for f in os.listdir(os.path.join(val, w)))[:n_ex]
    missing = [f for f in files if not os.path.exists(os.path.join(val, f))]
    if missing:
        raise SystemExit(f"error: {len(missing)} of {len(files)} images missing under {val}, e.g. "
                         f"{os.path.join(val, missing[0])}: --data must hold the full ImageNet val set "
                         "in wnid folders (see torchvision's ImageNet or valprep.sh)")
    xs = None
    if decode:
        tf = data.val_transform(img_size, crop_pct, interpolation)
        with ThreadPoolExecutor(8) as pool:
            xs = torch.stack(list(pool.map(lambda f: tf(Image.open(os.path.join(val, f)).convert('RGB')), files)))
    ys = torch.tensor([wnid_to_label[f.split('/')[0]] for f in files])
    return xs, ys, f"ImageNet val {val} ({'RobustBench 5000 list' if n_ex <= 5000 else 'sorted'}, " \
        f"first {len(files)}, resize {int(img_size / crop_pct)} {interpolation} + center crop {img_size})"


# What --bs 0 plans for, beyond the model's activations: fp32 tensors the size of the batch that an
# attack keeps (APGD's per-point state is about ten: x, x_adv and its previous value, best point,
# best adversarial, gradient and best gradient, outputs; its step's temporaries and the L1
# projection's sorts add as many at peak), and the share of the free memory it may fill (the rest
# is for the allocator's fragmentation and the cuBLAS / cuDNN workspaces).
IMAGE_COPIES, FREE_FRACTION = 24, 0.9


def _free_bytes(device):
    return torch.cuda.mem_get_info(device)[0] if device.type == 'cuda' else None


def auto_batch_size(model_args, img_size, device, n_points, bf16=False, fab_outputs=0):
    """--bs 0: the official 250 (at most the points per rank) where the memory plan fits it in
    FREE_FRACTION of the device's free memory, else the largest batch that fits (at least 1).
    fab_outputs: the model's outputs when untargeted FAB runs (it keeps one input gradient per
    output). On the CPU: the official 250. Returns (batch, why)."""
    import memplan
    cap = max(1, min(250, n_points))
    free = _free_bytes(device)
    if free is None:
        return cap, 'the official 250' + (f', capped by the {n_points} points per rank' if cap < 250 else '')
    fixed, per_image = memplan.eval_line(model_args, img_size, 'bfloat16' if bf16 else 'float32',
                                         IMAGE_COPIES + 2 * fab_outputs)
    budget = int(FREE_FRACTION * free)
    b = memplan.fitting_eval_batch((fixed, per_image), budget, cap)
    peak = fixed + per_image * b
    return b, (f"memory plan {peak / 2 ** 30:.1f} GiB of {free / 2 ** 30:.1f} GiB free on {device}" +
               (': does not fit, trying anyway' if peak > budget else ''))


class Bf16(torch.nn.Module):
    """bf16 autocast forward, fp32 logits. Not official AutoAttack: faster, can mask gradients."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


def save_examples(model, x, x_adv, y, path, k=8, class_names=None):
    """A PNG grid, one column per fooled point (at most k): the clean image captioned with its
    true and predicted labels, the adversarial image with its predicted label, and the
    perturbation amplified to full range with its Linf and L2 norms. Returns the same facts."""
    from PIL import Image, ImageDraw, ImageFont
    idx = ((x_adv - x).flatten(1).abs().sum(1) > 0).nonzero()[:k, 0]
    if len(idx) == 0:
        return []
    xc, xa = x[idx], x_adv[idx]
    d = xa - xc
    amp = d / (2 * d.flatten(1).abs().max(1)[0].clamp_min(1e-12).view(-1, 1, 1, 1)) + 0.5
    dev = next(model.parameters()).device
    with torch.no_grad():
        pc, pa = model(xc.to(dev)).argmax(1).tolist(), model(xa.to(dev)).argmax(1).tolist()
    name = lambda c: class_names[c] if class_names and c < len(class_names) else str(c)
    facts = [dict(index=int(i), label=int(y[i]), clean_pred=pc[j], adv_pred=pa[j], **{
        nm: float(_flat_norm(d[j:j + 1], nm)) for nm in ('Linf', 'L2', 'L1')}) for j, i in enumerate(idx)]
    tile = max(x.shape[-1], 112)  # small images upscaled (nearest) so the captions fit under them
    font, line, pad = ImageFont.load_default(), 12, 2
    cell_h = tile + 2 * line + pad
    grid = Image.new('RGB', (len(idx) * (tile + pad), 3 * cell_h), 'white')
    draw = ImageDraw.Draw(grid)
    for j, f in enumerate(facts):
        captions = [(f"true {name(f['label'])}", f"pred {name(f['clean_pred'])}"),
                    (f"pred {name(f['adv_pred'])}", ''),
                    (f"Linf {f['Linf'] * 255:.1f}/255", f"L2 {f['L2']:.2f}")]
        for r, img in enumerate((xc[j], xa[j], amp[j])):
            pil = Image.fromarray(img.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
            x0, y0 = j * (tile + pad), r * cell_h
            grid.paste(pil.resize((tile, tile), Image.NEAREST), (x0, y0))
            for t, text in enumerate(captions[r]):
                colour = 'red' if r == 1 and f['adv_pred'] != f['label'] else 'black'
                draw.text((x0 + 2, y0 + tile + t * line), text[:tile // 6], fill=colour, font=font)
    grid.save(path)
    return facts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', required=True, help="this project's checkpoint or a timm/AdvXL state dict, or an "
                    "open_clip model 'name[/tag][:file]' (e.g. ViT-B-32/openai): its zero-shot classifier")
    ap.add_argument('--arch', default=None, help='preset name when the file does not say (e.g. vit_huge_patch14)')
    ap.add_argument('--norm', default='Linf', choices=['Linf', 'L2', 'L1'])
    ap.add_argument('--eps', default=None, help='e.g. 4/255 (default: Linf 4/255, L2 2.0, L1 75)')
    ap.add_argument('--data', default=None, help='ImageNet root (with val/ of wnid folders); default: demo val')
    ap.add_argument('--n_ex', type=int, default=5000, help='points (ImageNet: <= 5000 uses the RobustBench list)')
    ap.add_argument('--bs', type=int, default=0, help='batch size per rank (also bounds target-class batching); '
                    '0: the official 250 where the memory plan fits it on the device, else the largest batch that '
                    'fits. An out-of-memory error halves it for the rest of the run')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--version', default='standard', choices=['standard', 'plus', 'rand', 'custom'])
    ap.add_argument('--attacks', default=None, help='comma list, e.g. apgd-ce,square (implies --version custom)')
    ap.add_argument('--state_path', default=None, help='resume file (per-batch progress; one per rank: PATH.rankR)')
    ap.add_argument('--save_examples', action='store_true', help='PNG grid of clean / adversarial / perturbation')
    ap.add_argument('--pgd20', action='store_true', help='the PGD-20 metric instead of AutoAttack')
    ap.add_argument('--pgd_step', default=None, help='PGD step (default 1/255 for Linf, eps/8 otherwise)')
    ap.add_argument('--compile', action='store_true', help='torch.compile the model (non-standard)')
    ap.add_argument('--bf16', action='store_true', help='bf16 autocast forward (non-standard)')
    ap.add_argument('--img_size', type=int, default=None, help="input resolution (default: the model's)")
    ap.add_argument('--preprocess', default='advxl', choices=['advxl', 'robustbench'],
                    help="ImageNet preprocessing: 'advxl' (default, the official AdvXL evaluation code): resize "
                         "int(img_size/0.9) bicubic, center crop; 'robustbench': Resize(256) + CenterCrop(224) "
                         "(bilinear, crop_pct 0.875 at other sizes)")
    ap.add_argument('--crop_pct', type=float, default=None,
                    help='ImageNet resize = img_size/crop_pct then center crop (overrides --preprocess\'s 0.9 / 0.875)')
    ap.add_argument('--device', default=None, help='default: cuda if available')
    ap.add_argument('--out_dir', default=None, help="folder for the results JSON (default: the checkpoint's; "
                    "out/eval_<spec> for an open_clip model)")
    ap.add_argument('--dist_timeout_s', type=float, default=3600, help="torchrun: the process group's timeout; "
                    "it covers the start only (ranks never wait on each other's attack work under it)")
    ap.add_argument('--dry_run', action='store_true', help='resolve the model, data and batch size, print them '
                    'in one line and stop')
    args = ap.parse_args(argv)
    if args.attacks:
        args.version = 'custom'
    attacks = args.attacks.split(',') if args.attacks else None
    try:
        attack_list = attack_config(args.version, args.norm, attacks)['attacks']
    except ValueError as e:  # e.g. an unknown attack name
        raise SystemExit(f"error: {e}")

    world = int(os.environ.get('WORLD_SIZE', 1))
    if world > 1 and not dist.is_initialized() and not args.dry_run:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo',
                                timeout=datetime.timedelta(seconds=args.dist_timeout_s))
    rank, world = _rank_world() if dist.is_initialized() else (int(os.environ.get('RANK', 0)), world)
    group = _patient_group()  # made now, while every rank is here
    local = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device(args.device or (f'cuda:{local}' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    say = print if rank == 0 else (lambda *a, **k: None)

    eps = parse_eps(args.eps) if args.eps is not None else DEFAULT_EPS[args.norm]
    eps_tag = (args.eps or {'Linf': '4/255', 'L2': '2.0', 'L1': '75'}[args.norm]).replace('/', '-')
    import clip_head
    import data
    import demo_data
    open_clip_spec = clip_head.is_open_clip_spec(args.ckpt)
    try:
        model_args = model_args_of(args.ckpt, args.arch)
    except ValueError as e:  # an --arch that does not fit the weights
        raise SystemExit(f"error: {e}")
    img_size = args.img_size or model_args['img_size']
    if args.data is None:
        x, y, data_desc = load_demo_val(img_size, args.n_ex, decode=not args.dry_run)
    else:
        official = args.preprocess == 'advxl'
        # an open_clip model's own preprocessing: resize the short side to img_size (bicubic), center crop
        crop_pct = args.crop_pct or (1.0 if open_clip_spec and official else 0.9 if official else 0.875)
        x, y, data_desc = load_imagenet_val(args.data, img_size, args.n_ex, crop_pct,
                                            'bicubic' if official else 'bilinear', decode=not args.dry_run)
        data_desc += f", --preprocess {args.preprocess}"
    if args.bs:
        bs, bs_why = args.bs, '--bs'
    else:
        untargeted_fab = not args.pgd20 and 'fab' in attack_list
        n_classes = len(demo_data.DEMO_CLASSES) if y is None else int(y.max()) + 1
        outputs = n_classes if model_args.get('embed_out') else model_args['num_classes']
        n_points = args.n_ex if y is None else len(y)
        bs, bs_why = auto_batch_size(model_args, img_size, device, math.ceil(n_points / world), args.bf16,
                                     outputs if untargeted_fab else 0)
        if group is not None:  # one batch size for every rank: the run is described by one number
            t = torch.tensor([bs])
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
            bs = int(t)
    what = "PGD-20" if args.pgd20 else f"AutoAttack {args.version}" + (f" ({args.attacks})" if args.attacks else '')
    if args.dry_run:
        line = (f"dry run: model {args.ckpt} ({model_args_desc(model_args, img_size)}), data: {data_desc}, {what}, "
                f"{args.norm} eps {eps:.5g}, batch {bs} per rank ({bs_why}), {world} rank(s), device {device}")
        say(line)
        return dict(dry_run=True, batch_size=bs, batch_size_from=bs_why, data=data_desc, img_size=img_size,
                    model_args=model_args, summary=line)
    demo_classes = data.class_names(os.path.join(demo_data.DEMO_ROOT, 'val')) if open_clip_spec and args.data is None else None
    model = load_model(args.ckpt, args.arch, classnames=demo_classes, device=device)
    say(f"model {args.ckpt} ({getattr(model, 'config', '')}), data: {data_desc}, device {device}, {world} rank(s), "
        f"batch {bs} per rank ({bs_why})")
    nonstandard = []
    if args.compile:
        model = torch.compile(model)
        nonstandard.append('torch.compile')
    if args.bf16:
        model = Bf16(model)
        nonstandard.append('bf16 autocast')
    if nonstandard:
        say(f"NON-STANDARD run ({', '.join(nonstandard)}): not the official AutoAttack setting; "
            "report these numbers as such")
    out_dir = args.ckpt if os.path.isdir(args.ckpt) else (os.path.dirname(args.ckpt) or '.')
    if open_clip_spec:  # results of an open_clip model go to out/eval_<spec>/
        out_dir = os.path.join('out', 'eval_' + ''.join(c if c.isalnum() or c in '-.' else '_' for c in args.ckpt))
    out_dir = args.out_dir or out_dir
    os.makedirs(out_dir, exist_ok=True)
    info = dict(ckpt=args.ckpt, arch=args.arch, data=data_desc, img_size=img_size, norm=args.norm, eps=eps,
                eps_str=args.eps, seed=args.seed, nonstandard=nonstandard, torch=torch.__version__,
                device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu', world=world,
                batch_size=bs, batch_size_from=bs_why, precision='bf16 autocast' if args.bf16 else 'fp32 (TF32 off)')

    # fp32 without TF32, as the official evaluation (cuDNN's default would run the patch embedding in TF32)
    with nullcontext() if args.bf16 else attack.TrueFp32():
        if args.pgd20:
            if args.norm == 'L1':
                raise SystemExit("error: --pgd20 supports Linf and L2 (attack.pgd)")
            step = parse_eps(args.pgd_step) if args.pgd_step else (1 / 255 if args.norm == 'Linf' else eps / 8)
            xs, ys = x[rank::world], y[rank::world]  # this rank's points alone, as for AutoAttack (see evaluate)

            def pgd20(b):  # the whole shard again after an out-of-memory error: the same run as one at b
                torch.manual_seed(args.seed)
                return attack.evaluate_pgd(model, zip(xs.split(b), ys.split(b)), eps, 20, step, args.norm, group=group)
            t0 = time.time()
            (clean_acc, robust_acc, total), bs = halve_on_oom(pgd20, bs, device, lambda old, new: print(
                f"{f'rank {rank}: ' if world > 1 else ''}out of memory at batch size {old}: {new} from here on"))
            n_clean, n_robust = round(clean_acc * total / 100), round(robust_acc * total / 100)
            res = dict(info, attack=f'PGD-20 step {step:.5g}', n=total, n_clean=n_clean, n_robust=n_robust,
                       clean_acc=clean_acc, robust_acc=robust_acc, time_s=time.time() - t0)
            out = os.path.join(out_dir, f'pgd20_{args.norm}_{eps_tag}.json')
            say(f"clean {res['clean_acc']:.2f}%  PGD-20 ({args.norm}, eps {eps:.5g}, step {step:.5g}) "
                f"{res['robust_acc']:.2f}%")
        else:
            r = evaluate(model, x, y, norm=args.norm, eps=eps, version=args.version, attacks=attacks,
                         batch_size=bs, seed=args.seed, state_path=args.state_path, log=say, device=device,
                         gather_adv=bool(args.save_examples))
            res = dict(info, **{k: v for k, v in r.items() if k not in ('x_adv', 'robust')})
            say(f"\n{'attack':<10} {'robust acc':>10}\n{'clean':<10} {r['clean_acc']:>9.2f}%")
            for a, acc in r['per_attack'].items():
                say(f"{a:<10} {acc:>9.2f}%")
            out = os.path.join(out_dir, f'autoattack_{args.norm}_{eps_tag}.json')
            if args.save_examples and rank == 0:
                names = data.class_names(os.path.join(demo_data.DEMO_ROOT, 'val')) if args.data is None else \
                    clip_head.imagenet_classnames()  # (ImageNet's labels: sorted wnids, the list's order)
                png = out[:-5] + '_examples.png'
                res['examples'] = save_examples(model, x, r['x_adv'], y, png, class_names=names)
                res['examples_png'] = png
                say(f"examples: {png} (rows: clean, adversarial, amplified perturbation)")
    if rank == 0:
        with open(out, 'w') as f:
            json.dump(res, f, indent=1)
        say(f"wrote {out}")
    if world > 1:
        dist.destroy_process_group()
    return res


if __name__ == '__main__':
    main()
