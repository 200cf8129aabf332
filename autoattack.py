"""
AutoAttack (Croce & Hein 2020), a faithful port of the official fra31/auto-attack code
(shipped unchanged in `pyautoattack` 0.2.0: the reference the tests compare against): APGD
(CE, DLR, targeted DLR, the L1 version with its projection and largereps), FAB and FAB-T, and
Square, each run on one batch of points (run_attack), with each version's attack list and
hyper-parameters (attack_config) and the official sanity checks (check_model).
eval_autoattack.py runs them over a data set: worst case over attacks, ranks, resume files.

Same algorithms, hyper-parameters and floating-point operations: from the same start, APGD and
FAB runs equal the official ones bit for bit in fp32. What differs makes it faster, never
changes a verdict:
- a point leaves the working batch as soon as it is fooled (the official code iterates it to
  the end; every per-point computation is independent of the other points, and all random
  draws of a run happen at its start, so the points that remain follow the same path);
- the target classes of APGD-T and FAB-T run together in one batch (rows = point x target)
  while that fits in batch_size: their outcomes are independent (the official code runs them one
  after the other, so the random starts of later targets differ, a sampling-noise difference).
"""
import math
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ATTACKS = ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t')


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

