"""autoattack.py and eval_autoattack.py against the official AutoAttack code (pyautoattack 0.2.0
ships it unchanged), on tiny MLPs over 3x8x8 inputs with 10 classes, CPU, one thread.

Fast tests run the official attack hyper-parameters except where noted (fewer Square queries,
fewer iterations in the resume / out-of-memory / ball tests); the full standard runs are marked
slow. Two ranks: tests/test_eval_distributed.py."""
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import autoattack  # noqa: E402
import eval_autoattack as ea  # noqa: E402

pyautoattack = pytest.importorskip('pyautoattack')
from pyautoattack import AutoAttack  # noqa: E402
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted, L1_projection  # noqa: E402
from pyautoattack.fab_pt import FABAttack_PT  # noqa: E402

SHAPE = (3, 8, 8)
EPS = {'Linf': 0.04, 'L2': 0.5, 'L1': 4.0}


def make_data(n, seed):
    """10 noisy Gaussian blobs in [0,1]^(3x8x8): about 93% clean accuracy for the MLPs."""
    means = torch.rand(10, *SHAPE, generator=torch.Generator().manual_seed(123)) * 0.3 + 0.35
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return (means[y] + 0.35 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1), y


def make_model(adv_train, steps=300):
    """An MLP trained for a few seconds; adv_train: on PGD-3 (eps 8/255) examples."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = make_data(2000, seed=1)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(steps):
        i = torch.randint(0, 2000, (128,))
        xb, yb = x[i], y[i]
        if adv_train:
            d = torch.empty_like(xb).uniform_(-8 / 255, 8 / 255)
            for _ in range(3):
                d.requires_grad_()
                g, = torch.autograd.grad(F.cross_entropy(m((xb + d).clamp(0, 1)), yb), d)
                d = (d + 4 / 255 * g.sign()).clamp(-8 / 255, 8 / 255).detach()
            xb = (xb + d).clamp(0, 1)
        loss = F.cross_entropy(m(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval().requires_grad_(False)


pytestmark = pytest.mark.usefixtures('one_thread')  # (conftest.py)


@pytest.fixture(scope='module')
def plain(one_thread):
    return make_model(False)


@pytest.fixture(scope='module')
def robust(one_thread):
    return make_model(True)


def quiet(*a, **k):
    pass


def official(model, x, y, norm, eps, attacks, iters=100, queries=5000, apgd_restarts=1, fab_restarts=1,
             apgd_targets=9, largereps=False, bs=250):
    """The official AutoAttack ('custom', with the given settings; the attack objects are
    rebuilt because APGD derives its checkpoints from n_iter in its constructor)."""
    aa = AutoAttack(model, norm=norm, eps=eps, version='custom', attacks=attacks, seed=0)
    aa.logger.disabled = True
    aa.apgd = APGDAttack(model, n_restarts=apgd_restarts, n_iter=iters, eps=eps, norm=norm, seed=0,
                         device='cpu', use_largereps=largereps, logger=aa.logger)
    aa.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_iter=iters, eps=eps, norm=norm, seed=0,
                                           device='cpu', n_target_classes=apgd_targets,
                                           use_largereps=largereps, logger=aa.logger)
    aa.fab.n_iter, aa.fab.n_restarts, aa.square.n_queries = iters, fab_restarts, queries
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=bs)
    return y_adv == y


def assert_close(ours, ref, n):
    """Within one point per 100 evaluated (the spec); in practice the sets are identical."""
    tol = max(1, math.ceil(n / 100))
    assert abs(int(ours.sum()) - int(ref.sum())) <= tol, (int(ours.sum()), int(ref.sum()))
    print(f"robust {int(ours.sum())} vs official {int(ref.sum())}, {int((ours != ref).sum())} points differ")


# ----------------------------------------------------------------------------- L1 projection
def l1_box_projection_bruteforce(x, z, eps, iters=200):
    """Euclidean projection of z onto {w: ||w||_1 <= eps, 0 <= x + w <= 1}: per coordinate
    clip(soft_threshold(z, lam), -x, 1 - x), with the smallest lam >= 0 that fits (bisection)."""
    x, z = x.flatten(1).double(), z.flatten(1).double()
    w_of = lambda lam: (z.sign() * (z.abs() - lam).clamp_min(0)).clamp(-x, 1 - x)
    lo, hi = torch.zeros(len(x), 1, dtype=torch.double), z.abs().max(1, keepdim=True)[0] + 1
    fits = w_of(lo).abs().sum(1, keepdim=True) <= eps
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = w_of(mid).abs().sum(1, keepdim=True) <= eps
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return torch.where(fits, w_of(torch.zeros_like(lo)), w_of(hi))


@pytest.mark.parametrize('eps', [0.5, 5.0, 40.0])
def test_l1_projection_matches_bruteforce_and_official(eps):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 6, 6, generator=g)
    x[:4] = x[:4].round()  # pixels on the box faces
    z = torch.randn(32, 3, 6, 6, generator=g) * torch.rand(32, 1, 1, 1, generator=g) * 2
    w = z + autoattack.l1_projection(x, z, eps)
    assert (w.flatten(1).abs().sum(1) <= eps + 1e-4).all()  # float32 sums: as the official
    assert ((x + w) >= -1e-6).all() and ((x + w) <= 1 + 1e-6).all()
    torch.testing.assert_close(w.flatten(1).double(), l1_box_projection_bruteforce(x, z, eps), atol=2e-5, rtol=0)
    assert torch.equal(autoattack.l1_projection(x, z, eps), L1_projection(x, z, eps))


def test_fab_projections_bitwise_official():
    from pyautoattack import fab_projections as fp
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        t, w, b = torch.rand(16, 40, generator=g), torch.randn(16, 40, generator=g), 3 * torch.randn(16, generator=g)
        w[:, :4] = 0
        assert torch.equal(autoattack._proj_linf(t, w, b), fp.projection_linf(t, w, b))
        assert torch.equal(autoattack._proj_l2(t, w, b), fp.projection_l2(t, w, b))
        assert torch.equal(autoattack._proj_l1(t, w, b), fp.projection_l1(t, w, b))


# ----------------------------------------------------------------------------- trajectories
@pytest.mark.parametrize('norm', ['Linf', 'L2', 'L1'])
@pytest.mark.parametrize('loss', ['ce', 'dlr'])
def test_apgd_trajectory_bitwise(plain, norm, loss):
    """From a common start, one APGD run equals the official attack_single_run bit for bit
    (fp32), and dropping fooled points does not change any verdict."""
    x, y = make_data(48, seed=5)
    eps = EPS[norm]
    torch.manual_seed(1)
    x0 = (x + 0.5 * eps * autoattack._normalize(torch.randn_like(x), norm)).clamp(0, 1)
    if norm == 'L1':
        x0 = x0 + L1_projection(x, x0 - x, eps)
    ref = APGDAttack(plain, n_iter=40, norm=norm, eps=eps, loss=loss, device='cpu')
    ref.init_hyperparam(x)
    r_best, r_acc, r_loss, r_adv = ref.attack_single_run(x, y, x_init=x0)
    fooled, x_found, x_best, loss_best = autoattack.apgd(plain, x, y, norm, eps, 40, loss, x_init=x0, drop=False)
    assert torch.equal(x_best, r_best) and torch.equal(loss_best, r_loss)
    assert torch.equal(fooled, ~r_acc) and torch.equal(x_found, r_adv)
    assert 0 < int(fooled.sum()) < len(x)
    fooled2, x_found2, _, _ = autoattack.apgd(plain, x, y, norm, eps, 40, loss, x_init=x0, drop=True)
    assert torch.equal(fooled2, fooled)
    assert (plain(x_found2[fooled2]).argmax(1) != y[fooled2]).all()


def test_apgd_l1_when_every_point_leaves_at_a_checkpoint(plain):
    """Under 50 iterations L1 APGD checks its step size every iteration, also right after the
    last points of the batch were fooled and left it (an empty batch)."""
    x, y = make_data(20, seed=3)
    keep = plain(x).argmax(1) == y
    fooled, x_found, _, _ = autoattack.apgd(plain, x[keep], y[keep], 'L1', 40.0, 10)
    assert fooled.all() and (plain(x_found).argmax(1) != y[keep]).all()


@pytest.mark.parametrize('norm', ['Linf', 'L2', 'L1'])
def test_fab_trajectory_bitwise(plain, norm):
    x, y = make_data(48, seed=5)
    keep = plain(x).argmax(1) == y  # FAB attacks correctly classified points only
    x, y = x[keep], y[keep]
    for targeted in (False, True):
        ref = FABAttack_PT(plain, norm=norm, n_iter=30, eps=EPS[norm], device='cpu')
        ref.target_class = 3
        r_adv = ref.attack_single_run(x, y, use_rand_start=False, is_targeted=targeted)
        r_fooled = (plain(r_adv).argmax(1) != y) & (autoattack._flat_norm(r_adv - x, norm) <= EPS[norm])
        tgt = plain(x).sort(1)[1][:, -3] if targeted else None
        fooled, adv = autoattack.fab(plain, x, y, norm, EPS[norm], 30, tgt, drop=False)
        assert torch.equal(adv, r_adv) and torch.equal(fooled, r_fooled)
        assert torch.equal(autoattack.fab(plain, x, y, norm, EPS[norm], 30, tgt, drop=True)[0], fooled)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_parity_each_attack(plain, robust, norm):
    """Every attack alone ('custom'), official iterations, Square with 1000 queries."""
    x, y = make_data(60, seed=5)
    for model in (plain, robust):
        for atk in ['apgd-ce', 'apgd-dlr', 'apgd-t', 'fab', 'fab-t', 'square']:
            ours = ea.evaluate(model, x, y, norm=norm, eps=EPS[norm], version='custom', attacks=[atk], log=quiet,
                               overrides=dict(apgd_restarts=1, fab_restarts=2, square_queries=1000))
            ref = official(model, x, y, norm, EPS[norm], [atk], queries=1000, fab_restarts=2)
            assert_close(ours['robust'], ref, len(x))


def test_parity_standard_linf(robust):
    """The whole standard L_inf run with the official settings (Square 5000 queries)."""
    x, y = make_data(60, seed=5)
    ours = ea.evaluate(robust, x, y, norm='Linf', eps=EPS['Linf'], log=quiet)
    assert list(ours['per_attack']) == ['apgd-ce', 'apgd-t', 'fab-t', 'square']
    aa = AutoAttack(robust, norm='Linf', eps=EPS['Linf'], version='standard', seed=0)
    aa.logger.disabled = True
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=250)
    assert_close(ours['robust'], y_adv == y, len(x))


@pytest.mark.slow
@pytest.mark.parametrize('norm', ['Linf', 'L2', 'L1'])
@pytest.mark.parametrize('which', ['plain', 'robust'])
def test_parity_standard_full(plain, robust, norm, which):
    """Per-attack cumulative robust accuracy of the standard version, 100 points, official run
    attack by attack (custom lists of growing length reproduce the cumulative numbers)."""
    model = plain if which == 'plain' else robust
    x, y = make_data(100, seed=7)
    ours = ea.evaluate(model, x, y, norm=norm, eps=EPS[norm], log=quiet)
    aa = AutoAttack(model, norm=norm, eps=EPS[norm], version='standard', seed=0)
    aa.logger.disabled = True
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=250)
    assert_close(ours['robust'], y_adv == y, len(x))
    L1 = dict(apgd_restarts=5, apgd_targets=5, largereps=True) if norm == 'L1' else {}
    for k, atk in enumerate(ours['per_attack']):
        ref = official(model, x, y, norm, EPS[norm], list(ours['per_attack'])[:k + 1], **L1)
        assert abs(int(ref.sum()) - ours['counts'][atk]) <= 1, atk


# ----------------------------------------------------------------------------- guarantees
FAST = dict(apgd_iter=20, fab_iter=20, square_queries=300)


@pytest.mark.parametrize('norm', ['Linf', 'L2', 'L1'])
def test_adversarials_in_ball_and_box(plain, norm):
    x, y = make_data(40, seed=3)
    r = ea.evaluate(plain, x, y, norm=norm, eps=EPS[norm], log=quiet, overrides=FAST)
    broken = (r['x_adv'] != x).flatten(1).any(1)
    assert broken.any()
    assert (autoattack._flat_norm(r['x_adv'] - x, norm) <= EPS[norm] + 1e-4).all()  # float32 rounding
    assert r['x_adv'].min() >= 0 and r['x_adv'].max() <= 1
    assert (plain(r['x_adv'][broken]).argmax(1) != y[broken]).all()
    assert r['n_robust'] == int(r['robust'].sum()) and not (broken & r['robust']).any()
    assert r['n_clean'] >= r['n_robust'] and list(r['per_attack'].values()) == sorted(r['per_attack'].values())[::-1]


class Stop(Exception):
    pass


@pytest.mark.parametrize('stop_at', ['robust accuracy after APGD-CE', 'apgd-t: batch 2', 'fab-t: batch 1'])
def test_resume_equals_uninterrupted(plain, tmp_path, stop_at):
    x, y = make_data(60, seed=5)
    kw = dict(norm='Linf', eps=0.03, batch_size=16, overrides=FAST)
    full = ea.evaluate(plain, x, y, log=quiet, **kw)
    again = ea.evaluate(plain, x, y, log=quiet, **kw)  # deterministic with a fixed seed
    assert full['counts'] == again['counts'] and torch.equal(full['x_adv'], again['x_adv'])

    def log(line):
        if line.startswith(stop_at):
            raise Stop
    path = str(tmp_path / 'state.pt')
    with pytest.raises(Stop):
        ea.evaluate(plain, x, y, log=log, state_path=path, **kw)
    lines = []
    res = ea.evaluate(plain, x, y, log=lines.append, state_path=path, **kw)
    assert any(line.startswith('resuming') for line in lines)
    assert not any(line.startswith('apgd-ce: batch') for line in lines)  # finished attacks are not redone
    assert res['counts'] == full['counts'] and dict(res['per_attack']) == dict(full['per_attack'])
    assert torch.equal(res['x_adv'], full['x_adv']) and torch.equal(res['robust'], full['robust'])
    with pytest.raises(ValueError):  # a state file from another evaluation is refused
        ea.evaluate(plain, x, y, log=quiet, state_path=path, **{**kw, 'eps': 0.02})
    with pytest.raises(ValueError):  # ... also when only the images changed
        ea.evaluate(plain, x.flip(-1), y, log=quiet, state_path=path, **kw)


class OOMOnce(nn.Module):
    """The model, except that its forward pass number `at` raises an out-of-memory error; arm(k):
    the k-th forward pass from now."""
    def __init__(self, model, at=0):
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def arm(self, k):
        self.at = self.calls + k

    def forward(self, inp):
        self.calls += 1
        if self.calls == self.at:
            raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return self.model(inp)


def test_out_of_memory_halves_the_batch(plain, tmp_path):
    """An out-of-memory error at the first forward pass at batch 16 gives the run at batch 8, with
    one line saying so; after one in the middle of APGD-T, a kill and a resume keep batch 8."""
    x, y = make_data(60, seed=5)
    kw = dict(norm='Linf', eps=0.03, version='custom', attacks=['apgd-ce', 'apgd-t'],
              overrides=dict(FAST, apgd_restarts=1))
    half = ea.evaluate(plain, x, y, batch_size=8, log=quiet, **kw)
    assert not torch.equal(half['x_adv'], ea.evaluate(plain, x, y, batch_size=16, log=quiet, **kw)['x_adv'])
    lines = []
    r = ea.evaluate(OOMOnce(plain, 1), x, y, batch_size=16, log=lines.append, **kw)
    assert [line for line in lines if 'memory' in line] == ['out of memory at batch size 16: 8 from here on '
                                                            '(--bs 8 starts there)']
    assert r['counts'] == half['counts'] and r['batch_sizes'] == [8]
    assert torch.equal(r['robust'], half['robust']) and torch.equal(r['x_adv'], half['x_adv'])

    def run(log_too=quiet, **more):  # out of memory at the 5th forward pass of APGD-T's first batch (of 16)
        m = OOMOnce(plain)

        def log(line):
            if line.startswith('robust accuracy after APGD-CE'):
                m.arm(5)
            log_too(line)
        return ea.evaluate(m, x, y, batch_size=16, log=log, **kw, **more)
    once = run()
    assert once['batch_sizes'] == [8]

    def stop(line):
        if line.startswith('apgd-t: batch 2'):
            raise Stop
    path = str(tmp_path / 'state.pt')
    with pytest.raises(Stop):
        run(stop, state_path=path)
    lines = []
    res = ea.evaluate(plain, x, y, batch_size=16, log=lines.append, state_path=path, **kw)
    assert any(line.startswith('resuming') and line.endswith('batch size 8') for line in lines)
    assert res['counts'] == once['counts'] and torch.equal(res['x_adv'], once['x_adv'])
    with pytest.raises(SystemExit, match='out of memory'):  # no batch is small enough
        ea.evaluate(OOMOnce(plain, 1), x, y, batch_size=1, log=quiet, **kw)


def pico_checkpoint(path, arch='vit_pico_patch4'):
    """A checkpoint of a freshly initialised preset, as train.py's hold it; returns its model_args."""
    import dataclasses
    import model as model_lib
    m = model_lib.create_model(arch)
    torch.save({'model': m.timm_state_dict(), 'model_args': dataclasses.asdict(m.config)}, path)
    return dataclasses.asdict(m.config)


def test_batch_size_from_the_memory_plan(tmp_path, monkeypatch, capsys):
    """--bs 0 picks the largest batch whose memory plan fits the device's free memory (a fake
    figure here; the CPU has none: the official 250, capped by the points); --dry_run says which
    in one line and attacks nothing."""
    import memplan
    ckpt = tmp_path / 'ckpt.pt'
    args = pico_checkpoint(ckpt)
    fixed, per_image = memplan.eval_line(args, 32, image_copies=ea.IMAGE_COPIES)
    planned = lambda b: fixed + per_image * b
    assert memplan.eval_activation_line(args, 32)[1] < per_image  # the images are counted too
    budget = planned(37) + per_image // 2
    free = int(budget / ea.FREE_FRACTION) + 1
    assert planned(37) <= int(ea.FREE_FRACTION * free) < planned(38)
    monkeypatch.setattr(ea, '_free_bytes', lambda device: free)
    r = ea.main(['--ckpt', str(ckpt), '--n_ex', '100', '--dry_run'])
    assert r['batch_size'] == 37 and 'memory plan' in r['batch_size_from']
    r = ea.main(['--ckpt', str(ckpt), '--n_ex', '20', '--dry_run'])
    assert r['batch_size'] == 20  # never more than the points
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith('dry run:') and 'batch 37 per rank' in out[0]
    monkeypatch.setattr(ea, '_free_bytes', lambda device: fixed)  # not even one image: tries one anyway
    r = ea.main(['--ckpt', str(ckpt), '--n_ex', '100', '--dry_run'])
    assert r['batch_size'] == 1 and 'does not fit' in r['batch_size_from']
    monkeypatch.undo()
    assert ea.main(['--ckpt', str(ckpt), '--n_ex', '300', '--dry_run'])['batch_size'] == 250
    assert ea.main(['--ckpt', str(ckpt), '--n_ex', '30', '--dry_run', '--bs', '7'])['batch_size'] == 7
    assert not list(tmp_path.glob('*.json'))
    with pytest.raises(SystemExit, match='--data'):
        ea.main(['--ckpt', str(ckpt), '--dry_run', '--data', str(tmp_path / 'nope')])


def test_pgd20_out_of_memory_reruns_at_half(tmp_path, monkeypatch, capsys):
    """--pgd20: an out-of-memory error mid-way reruns this rank's points at half the batch."""
    ckpt = tmp_path / 'ckpt.pt'
    pico_checkpoint(ckpt)
    cli = ['--ckpt', str(ckpt), '--n_ex', '8', '--pgd20', '--eps', '4/255']
    half = ea.main(cli + ['--bs', '2'])
    load = ea.load_model
    monkeypatch.setattr(ea, 'load_model', lambda *a, **k: OOMOnce(load(*a, **k), 7))  # in the first PGD-20
    r = ea.main(cli + ['--bs', '4'])
    assert 'out of memory at batch size 4: 2 from here on' in capsys.readouterr().out
    assert (r['n'], r['n_clean'], r['n_robust']) == (half['n'], half['n_clean'], half['n_robust'])


# ----------------------------------------------------------------------------- checks, config
def test_warnings(plain):
    x, y = make_data(20, seed=3)
    kw = dict(norm='Linf', eps=0.03, version='custom', attacks=['apgd-ce'],
              overrides=dict(apgd_iter=5, apgd_restarts=1))

    class Noisy(nn.Module):
        def forward(self, inp):
            return plain(inp) + torch.randn(len(inp), 10)
    lines = []
    r = ea.evaluate(Noisy(), x, y, log=lines.append, **kw)
    assert any('not deterministic' in w for w in r['warnings']) and any(line.startswith('WARNING') for line in lines)
    assert not any('not deterministic' in w for w in ea.evaluate(plain, x, y, log=quiet, **kw)['warnings'])
    soft = nn.Sequential(plain, nn.Softmax(-1))
    assert any('probabilities' in w for w in ea.evaluate(soft, x, y, log=quiet, **kw)['warnings'])
    three = nn.Sequential(plain, nn.Linear(10, 3)).eval()
    r = ea.evaluate(three, x, y % 3, log=quiet, **{**kw, 'attacks': ['apgd-t'], 'overrides': dict(apgd_iter=5)})
    assert any('DLR' in w for w in r['warnings'])


def test_versions():
    std = autoattack.attack_config('standard', 'Linf')
    assert std['attacks'] == ['apgd-ce', 'apgd-t', 'fab-t', 'square'] and std['apgd_restarts'] == 1
    assert (std['apgd_iter'], std['apgd_targets'], std['fab_targets'], std['square_queries']) == (100, 9, 9, 5000)
    l1 = autoattack.attack_config('standard', 'L1')
    assert l1['largereps'] and l1['apgd_restarts'] == 5 and l1['apgd_targets'] == 5
    plus = autoattack.attack_config('plus', 'L2')
    assert plus['attacks'] == ['apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t']
    assert plus['apgd_restarts'] == 5 and plus['fab_restarts'] == 5
    rand = autoattack.attack_config('rand', 'Linf')
    assert rand['attacks'] == ['apgd-ce', 'apgd-dlr'] and rand['eot_iter'] == 20 and rand['apgd_restarts'] == 1
    with pytest.raises(ValueError):
        autoattack.attack_config('standard', 'Linf', attacks=['apgd-ce'])
    assert ea.parse_eps('4/255') == 4 / 255 and ea.parse_eps('2.0') == 2.0


def test_rand_version_runs_eot(plain):
    x, y = make_data(12, seed=3)
    r = ea.evaluate(plain, x, y, version='rand', log=quiet, overrides=dict(apgd_iter=3))
    assert list(r['per_attack']) == ['apgd-ce', 'apgd-dlr']


def test_cli_missing_data_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        ea.load_imagenet_val(str(tmp_path / 'nope'), 224, 10, 0.875, 'bilinear')
    assert 'nope' in str(e.value) and '--data' in str(e.value)
    ids = open(os.path.join(os.path.dirname(ea.__file__), 'assets', 'imagenet_test_image_ids.txt')).read().split()
    assert len(ids) == 5000 and ids[0] == 'n09468604/ILSVRC2012_val_00015253.JPEG'
    # a fake val folder with the first 3 listed images: RobustBench order, sorted-wnid labels
    from PIL import Image
    for f in ids[:3]:
        os.makedirs(tmp_path / 'val' / f.split('/')[0], exist_ok=True)
        Image.new('RGB', (80, 60), (200, 10, 10)).save(tmp_path / 'val' / f)
    x, y, desc = ea.load_imagenet_val(str(tmp_path), 32, 3, 0.875, 'bilinear')
    wnids = sorted(__import__('json').load(open(os.path.join(os.path.dirname(ea.__file__), 'assets',
                                                               'imagenet_class_to_id_map.json'))))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [wnids.index(f.split('/')[0]) for f in ids[:3]]
    with pytest.raises(SystemExit) as e:  # asking for more than the folder holds names a missing file
        ea.load_imagenet_val(str(tmp_path), 32, 4, 0.875, 'bilinear')
    assert ids[3].split('/')[1] in str(e.value)


@pytest.mark.parametrize('arch', ['vit_pico_patch4', 'convnext_demo'])
def test_cli_smoke(tmp_path, arch):
    """The command line on the demo val set with a freshly built checkpoint of either architecture."""
    ckpt = tmp_path / 'ckpt.pt'
    pico_checkpoint(ckpt, arch)
    r = ea.main(['--ckpt', str(ckpt), '--n_ex', '6', '--attacks', 'apgd-ce', '--eps', '1/255', '--save_examples'])
    assert os.path.exists(tmp_path / 'autoattack_Linf_1-255.json') and r['n'] == 6
    assert list(r['per_attack']) == ['apgd-ce'] and r['nonstandard'] == []
    r = ea.main(['--ckpt', str(ckpt), '--n_ex', '6', '--pgd20', '--eps', '1/255'])
    assert os.path.exists(tmp_path / 'pgd20_Linf_1-255.json') and 0 <= r['robust_acc'] <= r['clean_acc']


def test_zero_shot_classifier_is_the_one_training_evaluated_with(tmp_path):
    """A CLIP run of train.py in bf16 (its classifier differs from an fp32 one): load_model's
    zero-shot classifier is the one train.py evaluated with, read from the checkpoint or, for a
    checkpoint without it, rebuilt from the run's tower, seed, precision, class names and prompts."""
    import subprocess
    import demo_data
    from checkpoint import read_checkpoint
    root = demo_data.ensure_demo(str(tmp_path / 'demo'), n_train=32, n_val=10, shard_size=32)
    r = subprocess.run([sys.executable, 'train.py', 'config/demo_clip.py', f'--train_data={root}/shards/train-0000.tar',
                        f'--val_data={root}/val', '--model=vit_pico_patch4', '--text_tower=tiny-text', '--samples=16',
                        '--batch_size=16', '--log_every=16', '--warmup_samples=0', '--eps_warmup=0', '--num_workers=0',
                        '--shuffle_buffer=16', '--final_eval_samples=4', '--dtype=bfloat16',
                        f'--out_dir={tmp_path}/web'],
                       cwd=os.path.join(os.path.dirname(__file__), '..'), env={**os.environ, 'OMP_NUM_THREADS': '1'},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = dict(read_checkpoint(str(tmp_path / 'web')))
    evaluated = ckpt.pop('zeroshot_weights')
    assert torch.equal(ea.load_model(str(tmp_path / 'web')).weights, evaluated)
    torch.save(ckpt, tmp_path / 'without.pt')  # as written before checkpoints held the classifier
    assert torch.equal(ea.load_model(str(tmp_path / 'without.pt')).weights, evaluated)
    assert not torch.equal(ea.training_zeroshot_weights(dict(ckpt['config'], dtype='float32')), evaluated)


def test_save_examples_grid(tmp_path):
    """One column per changed point: the clean image, the adversarial one (captioned in red when
    fooled) and the amplified perturbation, with the labels the model predicts."""
    import numpy as np
    from PIL import Image
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 10)).eval().requires_grad_(False)
    x = torch.rand(4, *SHAPE)
    y = model(x).argmax(1)
    x_adv = x.clone()
    x_adv[1] = (x[1] + 0.3 * torch.sign(model[1].weight[(y[1] + 1) % 10] - model[1].weight[y[1]]).view(SHAPE)).clamp(0, 1)
    x_adv[3] = (x[3] + 0.01).clamp(0, 1)  # changed, likely not fooled
    names = [f'c{i}' for i in range(10)]
    facts = ea.save_examples(model, x, x_adv, y, tmp_path / 'ex.png', class_names=names)
    assert [f['index'] for f in facts] == [1, 3]
    with torch.no_grad():
        assert [f['adv_pred'] for f in facts] == model(x_adv[[1, 3]]).argmax(1).tolist()
        assert [f['clean_pred'] for f in facts] == y[[1, 3]].tolist() == [f['label'] for f in facts]
    assert facts[0]['adv_pred'] != facts[0]['label']
    assert abs(facts[1]['Linf'] - float((x_adv[3] - x[3]).abs().max())) < 1e-6
    img = np.asarray(Image.open(tmp_path / 'ex.png').convert('RGB')).astype(int)
    tile, cell_h = 112, 112 + 2 * 12 + 2
    assert img.shape == (3 * cell_h, 2 * (tile + 2), 3)
    clean = (x[1].permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert (img[:tile:14, :tile:14] == clean).all()  # nearest upscaling by 14: every 14th pixel
    caption = img[cell_h + tile:2 * cell_h, :tile]   # under the first adversarial image
    red = (caption[..., 0] > 150) & (caption[..., 1] < 100) & (caption[..., 2] < 100)
    assert red.any()  # fooled: captioned in red
    assert (img[tile:tile + 24, :tile] < 128).any()  # the clean caption was drawn
