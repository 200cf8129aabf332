import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

from attack import evaluate_pgd, pgd


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(8 * 8 * 8, 10))


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


ce = lambda out, y: F.cross_entropy(out, y)


@pytest.mark.parametrize('norm,eps', [('Linf', 8 / 255), ('L2', 0.5)])
def test_inside_ball_and_box(norm, eps):
    net = small_net().eval()
    x, y = batch()
    x_adv = pgd(net, x, y, ce, eps, eps / 4, 10, norm)
    d = (x_adv - x).flatten(1)
    size = d.abs().max(1).values if norm == 'Linf' else d.norm(dim=1)
    assert (size <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad
    with torch.no_grad():
        assert F.cross_entropy(net(x_adv), y) > F.cross_entropy(net(x), y)  # it did attack


@pytest.mark.parametrize('norm,eps,steps', [('Linf', 8 / 255, 10), ('L2', 0.5, 10)])
def test_matches_torchattacks_from_the_same_start(norm, eps, steps):
    net = small_net().eval()
    x, y = batch()
    theirs = (torchattacks.PGD(net, eps=eps, alpha=eps / 4, steps=steps) if norm == 'Linf'
              else torchattacks.PGDL2(net, eps=eps, alpha=eps / 4, steps=steps))
    torch.manual_seed(5)
    ref = theirs(x, y)
    torch.manual_seed(5)  # the same random start: both draw it first from torch's global RNG
    ours = pgd(net, x, y, ce, eps, eps / 4, steps, norm)
    if norm == 'Linf':
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    else:  # torchattacks' L2 start draws a differently shaped radius; compare the outcome
        with torch.no_grad():
            assert abs(F.cross_entropy(net(ours), y) - F.cross_entropy(net(ref), y)) < 0.05


def test_no_weight_gradients_and_mode_restored():
    net = small_net().train()
    x, y = batch()
    pgd(net, x, y, ce, 8 / 255, 2 / 255, 3)
    assert all(p.grad is None for p in net.parameters())
    assert net.training and all(m.training for m in net.modules())
    bn = net[1]
    running = bn.running_mean.clone()
    pgd(net.eval(), x, y, ce, 8 / 255, 2 / 255, 3)
    assert not net.training and torch.equal(bn.running_mean, running)  # eval mode: no BN stat updates


def test_soft_targets_and_forward_kwargs():
    net = small_net().eval()
    x, y = batch()
    soft = F.one_hot(y, 10).float() * 0.9 + 0.01
    x_adv = pgd(net, x, soft, ce, 8 / 255, 8 / 255, 1)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    calls = []
    f = lambda inp, scale=1.0: calls.append(scale) or net(inp) * scale
    wrapper = nn.Module()
    wrapper.forward = f
    pgd(wrapper, x, y, ce, 8 / 255, 8 / 255, 2, scale=2.0)
    assert calls == [2.0, 2.0]


def test_evaluate_pgd_counts():
    net = small_net().eval()
    x, y = batch(32)
    with torch.no_grad():
        y = net(x).argmax(1)  # every point clean-correct
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    clean, robust, n = evaluate_pgd(net, loader, eps=0.0)
    assert (clean, robust, n) == (100.0, 100.0, 32)
    clean, robust, n = evaluate_pgd(net, loader, eps=0.5, steps=10, step_size=0.1)
    assert clean == 100.0 and robust < 50.0


def test_frozen_weights_same_attack_and_restored():
    """freeze_weights (the default) changes only what autograd records: the same x_adv bitwise,
    every parameter requires grad again afterwards, also when the loss raises."""
    import model as M
    net = M.create_model('vit_pico_patch4', img_size=16)
    net.head.bias.requires_grad_(False)  # a parameter the caller froze stays frozen
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(3)
    a = pgd(net, x, y, ce, 8 / 255, 2 / 255, 3, freeze_weights=False)
    torch.manual_seed(3)
    b = pgd(net, x, y, ce, 8 / 255, 2 / 255, 3)
    assert torch.equal(a, b)
    assert all(p.requires_grad for n, p in net.named_parameters() if n != 'head.bias')
    assert not net.head.bias.requires_grad

    def broken(out, t):
        assert not net.head.weight.requires_grad  # frozen while attacking
        raise RuntimeError('loss failed')
    with pytest.raises(RuntimeError, match='loss failed'):
        pgd(net, x, y, broken, 8 / 255, 2 / 255, 1)
    assert net.head.weight.requires_grad
