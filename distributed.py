"""
The process group of a training run, its CPU threads, and the SIGTERM flag that all ranks agree on.
"""
import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device, timeout_s):
    """(rank, world, device) of this process. Under a launcher (torchrun, or RANK/WORLD_SIZE/
    MASTER_ADDR set by hand) the process group is set up with NCCL on CUDA, gloo otherwise, and
    the device becomes this rank's GPU."""
    if int(os.environ.get('RANK', -1)) == -1:
        return 0, 1, device
    # torchrun's (static) rendezvous keeps one store across --max-restarts rounds: keep each round's keys
    # apart, or a restarted rank reads its dead peer's old address and never connects
    store, _, _ = next(dist.rendezvous('env://', timeout=timedelta(seconds=timeout_s)))
    store = dist.PrefixStore(f"round_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    cuda = device.startswith('cuda')
    if cuda:  # this rank's GPU, bound before NCCL starts (device_id: no guessing it from the rank)
        device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if cuda else 'gloo', store=store,
                            rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']),
                            timeout=timedelta(seconds=timeout_s), device_id=torch.device(device) if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def leave_distributed():
    """Destroy the process groups and collect what referenced them. The caller first drops its own
    references (a DDP model, extra groups): a gloo group still alive when the interpreter exits can
    abort the process with SIGABRT after a successful run (its threads outlive the interpreter's
    teardown), which torchrun then reports as a failed job."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


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
