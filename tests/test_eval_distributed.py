"""eval_autoattack.py under torch.distributed: two real gloo processes on the CPU. A rank's share
may outlast the process group's timeout, ranks are killed and resumed, and either way the
per-point verdicts are those of single-process runs over the shards x[r::2]."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import eval_autoattack as ea  # noqa: E402
from test_autoattack import FAST, make_data, make_model, pico_checkpoint, quiet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(norm='Linf', eps=0.03, batch_size=16, overrides=FAST)

# One rank. Both ranks import first and start together (a file each), so that a short process-group
# timeout only ever measures waits on the other rank's work, never on its imports.
RANK_SCRIPT = """
import datetime, gc, json, os, sys, time, weakref
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import eval_autoattack as ea
torch.set_num_threads(1)
rank, job = int(sys.argv[1]), json.load(open(sys.argv[2]))
open(job['dir'] + f'/ready{{rank}}', 'w').close()
while not os.path.exists(job['dir'] + f'/ready{{1 - rank}}'):
    time.sleep(0.01)
timeout = datetime.timedelta(seconds=job['timeout_s'])
dist.init_process_group('gloo', init_method='tcp://127.0.0.1:' + job['port'], rank=rank, world_size=2, timeout=timeout)
model, x, y, kw = torch.load(job['inp'], weights_only=False)
def slow_down(m):  # rank 1's share takes job['delay'] s more: at its 9th forward pass, past the checks and clean pass
    forwards = []
    if rank == 1:
        m.register_forward_pre_hook(lambda *_: forwards.append(1) or time.sleep(job['delay'] * (len(forwards) == 9)))
    return m
slow_down(model)
kill_at, saves, save = job.get('kill', [0, 0])[rank], [], ea._save_atomic
def save_or_die(obj, path):  # killed at its kill_at-th state write, before writing
    saves.append(path)
    if len(saves) == kill_at:
        os._exit(9)
    save(obj, path)
ea._save_atomic = save_or_die
lines = []
r = ea.evaluate(model, x, y, log=lines.append, state_path=job.get('state'), **kw)
out = dict(counts=r['counts'], x_adv=r['x_adv'], robust=r['robust'], lines=lines,
           from_rank0=ea._from_rank0(lambda: torch.tensor([7.0 + rank])))
torch.save(out, job['dir'] + f'/out{{rank}}.pt')
if job.get('pgd20'):  # then the command line's PGD-20, its process group started by main()
    dist.destroy_process_group()
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=job['port2'], RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK='0')
    load = ea.load_model
    groups, init, new = [], dist.init_process_group, dist.new_group  # weak references to the groups main() makes
    dist.init_process_group = lambda *a, **k: (init(*a, **k), groups.append(weakref.ref(dist.group.WORLD)))[0]
    dist.new_group = lambda *a, **k: (lambda g: groups.append(weakref.ref(g)) or g)(new(*a, **k))
    ea.load_model = lambda *a, **k: slow_down(load(*a, **k))
    ea.main(['--ckpt', job['pgd20'], '--pgd20', '--n_ex', '8', '--bs', '4', '--eps', '1/255', '--device', 'cpu',
             '--dist_timeout_s', str(job['timeout_s']), '--out_dir', job['dir']])
    gc.collect()  # main() leaves no process group alive: one alive at exit can abort the process
    open(job['dir'] + f'/alive{{rank}}', 'w').write(str(sum(g() is not None for g in groups)))
else:
    from distributed import leave_distributed
    ea._patient.clear()
    leave_distributed()
"""


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def launch(tmp_path, tag, job, wait_s=120):
    """Both ranks of one job; returns their exit codes (a rank still running after wait_s is killed)."""
    d = tmp_path / tag
    d.mkdir()
    script, spec = d / 'rank.py', d / 'job.json'
    script.write_text(RANK_SCRIPT.format(root=ROOT))
    spec.write_text(json.dumps(dict(job, dir=str(d), port=free_port(), port2=free_port())))
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(spec)], env=env) for r in range(2)]
    deadline, codes = time.time() + wait_s, []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes, d


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """The MLP and blob data of test_autoattack, and single-process runs over each rank's shard."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread, as in test_autoattack
    model = make_model(False)
    x, y = make_data(60, seed=5)
    inp = tmp_path_factory.mktemp('in') / 'in.pt'
    torch.save((model, x, y, KW), inp)
    yield inp, x, [ea.evaluate(model, x[r::2], y[r::2], log=quiet, **KW) for r in range(2)]
    torch.set_num_threads(threads)


def assert_as_shards(out, x, shards):
    """The two-rank result is the single-process results of the shards, interleaved back."""
    assert out['counts'] == {k: shards[0]['counts'][k] + shards[1]['counts'][k] for k in shards[0]['counts']}
    for r in range(2):
        assert torch.equal(out['robust'][r::2], shards[r]['robust'])
        assert torch.equal(out['x_adv'][r::2], shards[r]['x_adv'])
    assert out['robust'].any() and not out['robust'].all() and (out['x_adv'] != x).any()


def test_slow_rank_outlasts_the_process_group_timeout(setup, tmp_path):
    """Rank 1's share of AutoAttack, then of PGD-20, takes 3 s longer than rank 0's, past the 2 s
    timeout of the process group: rank 0 waits without timing out, and the results are the shards'."""
    import attack
    import demo_data
    inp, x, shards = setup
    demo_data.ensure_demo()  # made once, here, not by two ranks at the same time
    ckpt = tmp_path / 'pico.pt'
    pico_checkpoint(ckpt)
    codes, d = launch(tmp_path, 'slow', dict(inp=str(inp), timeout_s=2, delay=3, pgd20=str(ckpt)))
    assert codes == [0, 0]
    out = torch.load(d / 'out0.pt')
    assert_as_shards(out, x, shards)
    assert out['from_rank0'].item() == 7.0 == torch.load(d / 'out1.pt')['from_rank0'].item()
    res = json.load(open(d / 'pgd20_Linf_1-255.json'))
    pico = ea.load_model(str(ckpt))
    xd, yd, _ = ea.load_demo_val(32, 8)
    counts = []
    for r in range(2):  # each rank's PGD-20 is a single-process run over its shard
        torch.manual_seed(0)
        clean, rob, total = attack.evaluate_pgd(pico, zip(xd[r::2].split(4), yd[r::2].split(4)), 1 / 255, 20, 1 / 255)
        counts.append((round(clean * total / 100), round(rob * total / 100)))
    assert (res['n'], res['n_clean'], res['n_robust']) == (8, *map(sum, zip(*counts)))
    assert [(d / f'alive{r}').read_text() for r in range(2)] == ['0', '0']  # no process group left at exit


def test_killed_ranks_resume_exactly(setup, tmp_path):
    """Both ranks killed at different points (rank 1 before its first state write, rank 0 mid-run),
    then the same command again: the verdicts of an uninterrupted run."""
    inp, x, shards = setup
    state = str(tmp_path / 'state.pt')
    job = dict(inp=str(inp), timeout_s=20, delay=0, state=state)
    codes, _ = launch(tmp_path, 'killed', dict(job, kill=[6, 1]))
    assert codes[1] == 9 and codes[0] != 0  # (rank 0 is killed too, or fails once rank 1 is gone)
    assert os.path.exists(state + '.rank0') and not os.path.exists(state + '.rank1')
    codes, d = launch(tmp_path, 'resumed', job)
    assert codes == [0, 0]
    out = torch.load(d / 'out0.pt')
    assert any(line.startswith('resuming') for line in out['lines'])
    assert_as_shards(out, x, shards)
