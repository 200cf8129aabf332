"""
The process group of a training run, its CPU threads, and the SIGTERM flag that all ranks agree on.
"""
import gc
import os
import socket
import time
import uuid
from contextlib import ExitStack
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device, timeout_s):
    """(rank, world, device) of this process. Under a launcher (torchrun, or RANK/WORLD_SIZE/
    MASTER_ADDR/MASTER_PORT set by hand, e.g. by srun) the process group is set up with NCCL on
    CUDA, gloo otherwise, and the device becomes this rank's GPU."""
    if int(os.environ.get('RANK', -1)) == -1:
        return 0, 1, device
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    timeout = timedelta(seconds=timeout_s)
    agent_store = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'  # else rank 0 hosts env://'s store
    if agent_store:
        expect_agent_store(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), min(60, timeout_s))
    store, _, _ = next(dist.rendezvous('env://', timeout=timeout))
    if agent_store:
        store = round_store(store, rank, world, timeout)
    cuda = device.startswith('cuda')
    if cuda:  # this rank's GPU, bound before NCCL starts (device_id: no guessing it from the rank)
        device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if cuda else 'gloo', store=store, rank=rank, world_size=world,
                            timeout=timeout, device_id=torch.device(device) if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def expect_agent_store(host, port, patience_s):
    """One line instead of a wait as long as dist_timeout_s when torchrun's store is gone. torchrun
    (c10d, sharing its store) keeps each round's store address on the node that hosted it; when
    that node is replaced and the new one becomes rank 0, the survivors still hand their workers
    the dead address."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            socket.create_connection((host, port), timeout=10).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"torchrun's store at {host}:{port} is unreachable ({e.strerror or e}): its agent "
                                 f"is gone; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (as "
                                 f"scripts/slurm/torchrun.sbatch does), so every round gets a fresh store")
            time.sleep(1)


ROUND_KEY, TOKEN_KEY = 'nanoadvxl/round_store', 'nanoadvxl/round_token'


def round_store(agent_store, rank, world, timeout, probe_s=5.0):
    """A store that lives exactly as long as this round of workers, hosted by this round's rank 0.

    torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE=True: static rendezvous, and c10d
    rendezvous unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) outlives its workers, so after a
    restart it still holds the dead round's keys: a rank that reads them dials its dead peer's
    address. No key in it tells the rounds apart on every node: TORCHELASTIC_RESTART_COUNT is
    each agent's own count (1 on the node whose worker died, 0 on a node restarted only because
    the membership changed), and MASTER_PORT stays the same. So, as torch itself does when the
    agent does not share its store (and under a plain launcher), rank 0 hosts a new store; the
    agent's store only says where. An entry there may be a dead round's: a rank takes the
    address only once the store behind it holds the same random token as the entry."""
    host = os.environ['MASTER_ADDR']
    if rank == 0:
        store = dist.TCPStore(host, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        token = uuid.uuid4().hex
        store.set(TOKEN_KEY, token)
        agent_store.set(ROUND_KEY, f'{store.port} {token}')
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port, token = agent_store.get(ROUND_KEY).decode().split()
        try:  # a dead round's address refuses the connection (checked quietly first), or lacks this token
            socket.create_connection((host, int(port)), timeout=probe_s).close()
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=probe_s))
            if store.check([TOKEN_KEY]) and store.get(TOKEN_KEY).decode() == token:
                store.set_timeout(timeout)
                return store
        except (OSError, RuntimeError, ValueError):  # DistStoreError and DistNetworkError are RuntimeErrors
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"rank {rank}: rank 0's store, announced in torchrun's store at {host}, never "
                             f"answered within {timeout.total_seconds():.0f} s (dist_timeout_s)")
        time.sleep(0.2)


def no_sync(modules, sync):
    """DDP's no_sync on each wrapped module (None: none) for an accumulation micro step; nothing
    when sync (the micro step that all-reduces the gradients)."""
    stack = ExitStack()
    for m in modules if not sync else ():
        if m is not None:
            stack.enter_context(m.no_sync())
    return stack


def leave_distributed():
    """Destroy the process groups and collect what referenced them. The caller first drops its own
    references (a DDP model, extra groups): a gloo group still alive when the interpreter exits can
    abort the process with SIGABRT after a successful run (its threads outlive the interpreter's
    teardown), which torchrun then reports as a failed job."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def agree_on_resume(samples_seen, out_dir):
    """Stop every rank, in one line, unless all resume from the same checkpoint (samples_seen of
    the one each read from its out_dir, None for none). Each rank reads out_dir on its own node:
    a node-local disk, or a copy that missed the newest checkpoint, would otherwise start ranks
    from different points with nothing to say so (DDP copies rank 0's weights, not its
    optimizer state, data position or step count)."""
    if not dist.is_initialized():
        return
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, samples_seen)
    if len(set(seen)) == 1:
        return
    by_value = {}
    for r, s in enumerate(seen):
        by_value.setdefault(s, []).append(r)
    what = '; '.join(f"{'no checkpoint' if s is None else f'{s} samples'} on rank(s) {rank_ranges(rs)}"
                     for s, rs in by_value.items())
    leave_distributed()
    raise SystemExit(f"ranks disagree on the checkpoint to resume from in {out_dir} ({what}): every node must "
                     f"see the same out_dir (a shared file system), or copy rank 0's newest checkpoint to the others")


def rank_ranges(ranks):
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ','.join(f'{a}-{b}' if b > a else f'{a}' for a, b in runs)


def threads_per_rank(cpu_threads, num_workers, world):
    """torch's CPU threads for one rank: cpu_threads, else this node's cores shared by its ranks
    and their loader workers. GPU runs need the cap too: eight ranks that each use every core for
    the model's initialisation (ViT-g: 1B trunc_normal_ draws) and the zero-shot head crawl."""
    ranks_here = int(os.environ.get('LOCAL_WORLD_SIZE', world))
    return cpu_threads or max(1, (os.cpu_count() or 1) // ranks_here - num_workers)


class StopFlag:
    """Whether any rank got SIGTERM, agreed on by all ranks without a host sync in the step:
    each step starts an all-reduce of the local flag and reads the previous step's result,
    which finished long ago. So all ranks stop after the same step, at most 2 steps late.
    One device flag filled in place, and on CUDA one pinned host copy: a tensor built from
    Python data on a GPU every step would be a blocking copy from pageable memory."""

    def __init__(self, device, ddp):
        self.ddp = ddp
        self.flag = torch.zeros(1, device=device)
        cuda = torch.device(device).type == 'cuda'
        self.host = torch.zeros(1, pin_memory=True) if cuda else self.flag  # what the host reads
        self.ready = torch.cuda.Event() if cuda else None
        self.pending = None  # the previous step's all-reduce

    def finish(self):
        """Wait for the last step's all-reduce: no collective is left in flight at the end of the run."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def __call__(self, local):
        if not self.ddp:
            return local
        stop = False
        if self.pending is not None:
            self.pending.wait()
            if self.ready is not None:
                self.ready.synchronize()  # the previous step's copy: the GPU is one step ahead at most
            stop = self.host.item() > 0
        self.flag.fill_(float(local))
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.ready is not None:  # read it on the host a step later, from pinned memory
            self.pending.wait()  # (NCCL: the stream waits, not the host)
            self.host.copy_(self.flag, non_blocking=True)
            self.ready.record()
        return stop
