"""Multi-node runs on one machine: two torchrun agents with a c10d rendezvous stand in for two
nodes (real processes, gloo). Faults: a rank killed on one node, a whole node killed and started
again, SIGTERM to every process through the SLURM scripts (run by bash with stand-ins for srun,
scontrol and scancel: tests/fake_slurm), nodes whose out_dir copies disagree; and the data
streams split by global rank. Each run that survives ends bitwise equal to an uninterrupted one."""
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

import demo_data
import distributed
from bench import child_pids
from checkpoint import checkpoint_files, read_checkpoint
from test_faults import assert_same_weights, logged_once, newest_samples, wait_for, worker_pids
from test_train import ENV, ROOT, free_port, run2

FAKE_SLURM = os.path.join(ROOT, 'tests', 'fake_slurm')
# the demo stage (train.py's defaults) on a budget: 48 steps of 8 images, one thread per rank
DEMO = dict(model='vit_pico_patch4', samples=384, batch_size=8, log_every=32, ckpt_every=32, num_workers=0,
            eval_every=0, eval_samples=6, final_eval_samples=6, cpu_threads=1, mixup=0.4, drop_path_rate=0.1,
            ema_decay=0.9)


def demo_args(out, **kw):
    return [f'--{k}={v}' for k, v in {**DEMO, 'out_dir': str(out), **kw}.items()]


def agent(port, args, restarts=1, nnodes=2, nproc=1, local_addr=None):
    """One node's torchrun agent of an `nnodes`-node job meeting at 127.0.0.1:port (c10d)."""
    return [sys.executable, '-m', 'torch.distributed.run', f'--nnodes={nnodes}', f'--nproc_per_node={nproc}',
            '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{port}', f'--max-restarts={restarts}',
            *([f'--local-addr={local_addr}'] if local_addr else []), 'train.py', *args]


def start(cmd, log, env=None):
    """A process whose output goes to the file `log` (a pipe nobody reads would block it)."""
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, 'PYTHONUNBUFFERED': '1', **(env or {})}, stdout=open(log, 'a'),
                            stderr=subprocess.STDOUT)


def kill_tree(pid):
    for child in child_pids(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def finish(procs, timeout=300):
    """Wait for every process; on a timeout kill them all (and what they started) and fail."""
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pytest.fail('the job hung')
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
    return [p.returncode for p in procs]


def text(*logs):
    return ''.join(open(log).read() for log in logs)


@pytest.fixture(scope='module', autouse=True)
def demo():
    demo_data.ensure_demo()  # made once, here, not by the first run's rank 0 while the others wait


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The demo stage on 2 ranks, uninterrupted, under plain single-node torchrun."""
    out = tmp_path_factory.mktemp('reference') / 'run'
    run2(demo_args(out))
    return out


# ----------------------------------------------------------------------------- the process group's store
def test_a_dead_rounds_entry_in_torchruns_store_is_skipped(monkeypatch):
    """round_store: rank 1 ignores an announcement left by a dead round (nobody listens there) and
    one that reaches a live store of another round (a reused port: another token), and takes
    this round's rank 0 store once it is announced."""
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    agent_store = dist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)
    client = lambda: dist.TCPStore('127.0.0.1', agent_store.port, is_master=False)
    timeout = timedelta(seconds=30)
    agent_store.set(distributed.ROUND_KEY, f'{free_port()} dead')
    got = {}
    t = threading.Thread(target=lambda: got.update(store=distributed.round_store(client(), 1, 2, timeout)))
    t.start()
    time.sleep(1)
    other = dist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)
    other.set(distributed.TOKEN_KEY, 'another round')
    agent_store.set(distributed.ROUND_KEY, f'{other.port} stale')
    time.sleep(1)
    assert t.is_alive() and not got  # still waiting: neither is this round's store
    mine = distributed.round_store(client(), 0, 2, timeout)
    t.join(30)
    got['store'].set('hello', 'from rank 1')
    assert mine.get('hello') == b'from rank 1'


def test_a_gone_torchrun_store_is_one_line(monkeypatch):
    """A survivor handed the address of a store whose node was replaced stops in one line naming
    the fix, instead of waiting dist_timeout_s."""
    for k, v in dict(RANK='1', WORLD_SIZE='2', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()),
                     TORCHELASTIC_USE_AGENT_STORE='True').items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        distributed.init_distributed('cpu', timeout_s=1)
    assert 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1' in str(e.value) and '\n' not in str(e.value)


def test_rank_ranges():
    assert distributed.rank_ranges([0, 1, 2, 5, 7, 8]) == '0-2,5,7-8'


# ----------------------------------------------------------------------------- two agents, c10d
def test_rank_killed_on_one_node_both_restart_once(tmp_path, reference):
    """--max-restarts=1: the node whose rank died restarts with count 1, the other (membership
    changed) with 0; the restarted round must be the last one: one resume, weights bitwise
    equal to the uninterrupted run."""
    out, port = tmp_path / 'run', free_port()
    logs = [tmp_path / f'node{i}.log' for i in range(2)]
    nodes = [start(agent(port, demo_args(out)), log) for log in logs]
    try:
        wait_for(lambda: newest_samples(out) >= 64, nodes[1])
        os.kill(worker_pids(nodes[1].pid)[0], signal.SIGKILL)
    finally:
        codes = finish(nodes)
    log = text(*logs)
    assert codes == [0, 0], log[-3000:]
    assert log.count('resumed') == 1 and log.count(f'stage {out.name}:') == 2, log[-3000:]  # two rounds, no more
    assert 'connectFullMesh' not in log
    assert_same_weights(reference, out)
    logged_once(out)


def test_nodes_that_see_different_checkpoints_are_refused(tmp_path, reference):
    """Node-local out_dirs: one node's copy lacks the newest checkpoint. Every rank stops in one
    line naming what each would resume from; nothing is trained or written. The ranks are started
    as srun starts them without torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    dirs = [tmp_path / 'a', tmp_path / 'b']
    for d in dirs:
        shutil.copytree(reference, d)
        os.remove(d / 'results.json')
    os.remove(checkpoint_files(str(dirs[1]))[0])
    before = {d: sorted(os.listdir(d)) for d in dirs}
    port = free_port()
    logs = [tmp_path / f'rank{r}.log' for r in range(2)]
    codes = finish([start([sys.executable, 'train.py', *demo_args(d)], log,
                          dict(RANK=str(r), WORLD_SIZE='2', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)))
                    for r, (d, log) in enumerate(zip(dirs, logs))])
    assert codes == [1, 1]
    for log in logs:
        lines = [l for l in open(log) if not l.startswith('config:')]
        assert len(lines) == 1 and lines[0].startswith('ranks disagree on the checkpoint'), text(log)[-3000:]
        assert '384 samples on rank(s) 0; 352 samples on rank(s) 1' in lines[0]
    assert {d: sorted(os.listdir(d)) for d in dirs} == before


@pytest.mark.slow
def test_whole_node_killed_then_started_again(tmp_path, reference):
    """A node lost and replaced: the node holding rank 0 loses its agent and rank (SIGKILL), and
    the same command starts it again while the other node waits in the rendezvous. The new node
    sorts first (its address), so it is rank 0 again, with a new store: torchrun's shared store
    would leave the survivor the old address, hence TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as
    scripts/slurm/torchrun.sbatch sets it."""
    out, port = tmp_path / 'run', free_port()
    env = {'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}
    survivor = start(agent(port, demo_args(out), local_addr='127.0.0.2'), tmp_path / 'survivor.log', env)
    time.sleep(1)  # the survivor hosts the rendezvous store
    lost_cmd = agent(port, demo_args(out), local_addr='127.0.0.1')
    lost = start(lost_cmd, tmp_path / 'lost.log', env)
    procs = [survivor, lost]
    try:
        wait_for(lambda: newest_samples(out) >= 64, lost)
        kill_tree(lost.pid)
        lost.wait()
        killed_at = newest_samples(out)
        procs[1] = start(lost_cmd, tmp_path / 'requeued.log', env)
    finally:
        codes = finish(procs, timeout=400)
    log = text(tmp_path / 'survivor.log', tmp_path / 'requeued.log')
    assert codes == [0, 0], log[-3000:]
    assert f'resumed {out} at {killed_at} samples' in text(tmp_path / 'requeued.log')  # rank 0 is the new node
    assert_same_weights(reference, out)
    logged_once(out)


@pytest.mark.slow
@pytest.mark.parametrize('launch', ['standalone', 'static_two_nodes'])
def test_other_torchrun_rendezvous_restart_once(launch, tmp_path, reference):
    """The same fault under torchrun's other rendezvous: c10d on one node (--standalone, 2 ranks)
    and static on two nodes (--rdzv_backend=static, --node_rank; the other node's agent restarts
    when its rank loses its peer). One resume, bitwise."""
    out, port = tmp_path / 'run', free_port()
    run = [sys.executable, '-m', 'torch.distributed.run', '--max-restarts=1']
    if launch == 'standalone':
        cmds = [run + ['--standalone', '--nproc_per_node=2', 'train.py', *demo_args(out)]]
    else:
        cmds = [run + ['--nnodes=2', f'--node_rank={i}', '--nproc_per_node=1', '--rdzv_backend=static',
                       '--master_addr=127.0.0.1', f'--master_port={port}', 'train.py', *demo_args(out)] for i in range(2)]
    logs = [tmp_path / f'node{i}.log' for i in range(len(cmds))]
    procs = [start(c, log) for c, log in zip(cmds, logs)]
    try:
        wait_for(lambda: newest_samples(out) >= 64, procs[-1])
        os.kill(worker_pids(procs[-1].pid)[-1], signal.SIGKILL)
    finally:
        codes = finish(procs)
    log = text(*logs)
    assert codes == [0] * len(procs) and log.count('resumed') == 1, log[-3000:]
    assert_same_weights(reference, out)


# ----------------------------------------------------------------------------- the SLURM scripts
def sbatch(script, args, tmp_path, log, nodes=2):
    """bash runs the script as sbatch would on `nodes` nodes of one GPU each (one CPU rank here),
    with tests/fake_slurm's srun, scontrol and scancel on PATH."""
    env = {'PATH': f"{FAKE_SLURM}:{os.environ['PATH']}", 'FAKE_SLURM_DIR': str(tmp_path), 'SLURM_JOB_ID': '4242',
           'SLURM_JOB_NODELIST': ','.join(['127.0.0.1'] * nodes), 'SLURM_JOB_NUM_NODES': str(nodes),
           'SLURM_NTASKS': str(nodes), 'SLURM_NTASKS_PER_NODE': '1', 'SLURM_SUBMIT_DIR': ROOT,
           'PYTHON': sys.executable, 'NPROC_PER_NODE': '1', 'RDZV_PORT': str(free_port()),
           'MASTER_PORT': str(free_port())}
    return start(['bash', f'scripts/slurm/{script}', *args], log, env)


@pytest.mark.slow
@pytest.mark.parametrize('script', ['torchrun.sbatch', 'srun.sbatch'])
def test_sbatch_script_preempted_then_requeued(script, tmp_path, reference):
    """SIGTERM to the batch shell (SLURM's --signal=B:TERM before the time limit): its trap sends
    TERM to every process of the step (agents, ranks), every rank checkpoints within 2 steps, the
    job requeues itself; the requeued job (the same command) resumes, bitwise equal."""
    out, log = tmp_path / 'run', tmp_path / 'job.log'
    args = demo_args(out, ckpt_every=0)  # the only checkpoint is SIGTERM's
    job = sbatch(script, args, tmp_path, log)
    try:
        wait_for(lambda: any(l.startswith('run 64/') for l in open(log)), job)
        job.send_signal(signal.SIGTERM)
    finally:
        codes = finish([job])
    first = text(log)
    assert codes == [0], first[-3000:]
    line = next(l for l in first.splitlines() if l.startswith('SIGTERM at step'))
    got, saved = int(line.split()[3].rstrip(':')), int(line.split('at step ')[2].split()[0])
    assert 0 < saved - got <= 2, line
    assert read_checkpoint(str(out))['samples_seen'] == saved * DEMO['batch_size']
    assert open(tmp_path / 'requeued').read().split() == ['4242']
    assert finish([sbatch(script, args, tmp_path, tmp_path / 'requeued.log')]) == [0]
    assert f'resumed {out} at {saved * DEMO["batch_size"]} samples' in text(tmp_path / 'requeued.log')
    assert_same_weights(reference, out)


# ----------------------------------------------------------------------------- data on many nodes
RECORD_KEYS = '''
import os, runpy, sys
sys.path.insert(0, os.getcwd())  # the repository (torchrun runs this file from there)
import webdata
stream = webdata.WebLoader.__iter__
def recorded(self):  # the keys of every batch the training loop takes, one file per global rank
    with open(os.path.join(os.environ['KEYS_DIR'], 'keys-' + os.environ['RANK']), 'a') as f:
        for batch in stream(self):
            f.write(''.join(k + chr(10) for k in batch.key))
            f.flush()
            yield batch
webdata.WebLoader.__iter__ = recorded
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.mark.slow
def test_shards_split_by_global_rank_then_resumed_on_one_node(tmp_path):
    """2 nodes x 1 rank x 2 loader workers on labelled shards: within the first pass over the
    shards no sample reaches two ranks (each node's rank has local rank 0: a split by local rank
    would give both the same samples). Then the job, preempted, resumes on one node: the
    one-line warnings, and it finishes."""
    root = demo_data.ensure_demo(str(tmp_path / 'demo'), n_train=400, n_val=20, shard_size=50)
    keys = tmp_path / 'keys'
    keys.mkdir()
    (tmp_path / 'record_keys.py').write_text(RECORD_KEYS)
    out = tmp_path / 'run'
    args = demo_args(out, data='shards', train_data=f'{root}/shards/train-{{0000..0007}}.tar', val_data=f'{root}/val',
                     num_workers=2, shuffle_buffer=20, samples=320, ckpt_every=64, ema_decay=0)
    port = free_port()
    cmd = agent(port, args)
    cmd[cmd.index('train.py')] = str(tmp_path / 'record_keys.py')
    cmd.insert(cmd.index(str(tmp_path / 'record_keys.py')) + 1, 'train.py')
    logs = [tmp_path / f'node{i}.log' for i in range(2)]
    nodes = [start(cmd, log, {'KEYS_DIR': str(keys)}) for log in logs]
    try:
        wait_for(lambda: newest_samples(out) >= 192, nodes[0], timeout=400)
        for n in nodes:
            kill_tree(n.pid)  # the whole job lost (a requeue follows)
    finally:
        finish(nodes)
    seen = {r: open(keys / f'keys-{r}').read().split() for r in (0, 1)}
    assert len(seen[0]) >= 96 and len(seen[1]) >= 96
    both = seen[0] + seen[1]
    assert len(set(both)) == len(both)  # no sample twice: no stream has left the first pass
    shard_of = {}
    for i in range(8):
        with tarfile.open(f'{root}/shards/train-{i:04d}.tar') as t:
            shard_of.update({m.name.rsplit('.', 1)[0]: i for m in t.getmembers()})
    shards = {r: {shard_of[k] for k in seen[r]} for r in (0, 1)}
    assert not shards[0] & shards[1], shards  # whole shards per rank
    one_node = agent(free_port(), args, nnodes=1)
    r = subprocess.run(one_node, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resumed' in r.stdout
    warned = [l for l in r.stderr.splitlines() if l.startswith('warning: resuming with 1 rank(s) where the checkpoint ran 2')]
    assert len(warned) == 1, r.stderr[-3000:]
    assert 'webdata: resuming with another layout' in r.stderr
    assert read_checkpoint(str(out))['samples_seen'] == 320
