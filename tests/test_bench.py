"""bench.py's pieces on CPU: the peer is the same network, the steps train, the CUDA row's code runs,
the loader rate measures one loader's own worker, the demo rows read
the demo's budgets from its files."""
import pytest
import torch

import bench

CPU = torch.device('cpu')


@pytest.mark.parametrize('name,size', [('vit_demo_patch4', 16), ('vit_small_patch16', 112)])
def test_peer_is_the_same_network(name, size):
    _, ours = bench.ours_step(name, size, 1, 2, CPU)
    _, peer = bench.peer_step(name, size, 1, 2, CPU)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(ours) == count(peer.vit)
    # same function too: our loader takes the timm layout, logits equal on [0,1] images
    ours.load_weights(peer.vit.state_dict())
    x = torch.rand(2, 3, size, size)
    torch.testing.assert_close(ours.eval()(x), peer.eval()(x), rtol=1e-4, atol=1e-5)


def test_steps_change_the_weights():
    for make in (lambda: bench.ours_step('vit_pico_patch4', 16, 2, 4, CPU),
                 lambda: bench.peer_step('vit_pico_patch4', 16, 2, 4, CPU)):
        step, model = make()
        before = [p.detach().clone() for p in model.parameters()]
        step()
        assert all(p.requires_grad for p in model.parameters())  # the attack gave the weights back
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_cuda_row_code_runs_on_cpu():
    """The GPU row's code path (compile, FLOP and MFU arithmetic, checkpointing A/B) on a tiny model."""
    r = bench.bench_cuda(True, CPU, 1e12, rows=[('vit_pico_patch4', 16, 1, 4, True)])
    row = r['rows'][0]
    assert row['img_s'] > 0 and row['model_flops'] > 0 and 0 < row['mfu_vs_peak']
    assert r['grad_ckpt']['speed_ratio'] > 0


@pytest.mark.slow
def test_fast_path_row_runs():
    r = bench.bench_fast_path(True, CPU, rows=[('vit_pico_patch4', 16, 1, 4)])[0]
    assert r['freeze_speedup_eager'] > 0 and r['freeze_speedup_compiled'] > 0 and r['grad_ckpt_speed_ratio'] > 0


def test_autoattack_row_reads_the_official_log():
    """The row pairs our per-attack accuracy and time with those parsed from the official log."""
    pytest.importorskip('pyautoattack')
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval().requires_grad_(False)
    x = torch.rand(12, 3, 8, 8)
    y = model(x).argmax(1)  # all correct: every attack has points to run on
    r = bench.bench_autoattack(model, x, y, '12 random points', 'Linf', 2 / 255, version='custom',
                               attacks=['apgd-ce', 'apgd-dlr'])
    assert r['diff_points'] == 0 and [row[0] for row in r['per_attack']] == ['APGD-CE', 'APGD-DLR']
    assert 0 < r['per_attack'][0][1] < 100  # some points fooled, some not, at 2/255
    for name, ours, official, ours_s, official_s in r['per_attack']:
        # (the official log rounds to 0.1 s)
        assert round(ours, 2) == official and 0 <= official_s <= r['official_s'] + 0.05 and 0 <= ours_s <= r['ours_s']
    bench.print_tables({'info': dict(date='-', gpu=None, cpu_threads=1, quick=True), 'autoattack': {'t': r}})


def test_loader_rate_bills_only_its_own_worker_and_stops_it():
    """A loader left alive elsewhere (its worker idle or prefetching) is neither billed nor
    stopped; the measured loader's worker is gone when the rate comes back."""
    import os
    import data
    import decode
    import demo_data
    train = os.path.join(demo_data.ensure_demo(), 'train')
    make = lambda: data.image_folder_loader(train, decode.train_transform(16), 16, num_workers=1)  # noqa: E731
    before = set(bench.child_pids())  # children earlier tests in this process may have left
    other = iter(make())
    next(other)
    alive = set(bench.child_pids())
    assert len(alive - before) == 1
    wall, core = bench._loader_rate(make, 128)
    assert wall > 0 and core > 0 and set(bench.child_pids()) == alive


def test_demo_budgets_read_the_demo_files():
    """The demo and two_stage rows scale the budgets the demo's files set; the one-stage control
    sees as many samples as the two stages together."""
    pre, ft, one = bench.demo_budgets()
    assert set(pre) == set(bench.DEMO_BUDGET_KEYS)  # every key still a literal default of train.py
    assert ft['samples'] < pre['samples'] and one['samples'] == pre['samples'] + ft['samples']
    assert one['img_size'] == ft['img_size'] == 32
