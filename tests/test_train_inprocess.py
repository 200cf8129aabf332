"""train.py run inside the test process, where what it does can be watched and its state read.

The training step never waits on the device, checked without a GPU. Every kind of stage runs train.py in this process for two optimizer steps on the meta device
(tensors with shapes and no data), under a dispatch mode that records each operation which makes
a CUDA host wait: reading a device value (`.item()`, `.tolist()`, `bool(t)`, `int(t)`, all of which
are `aten._local_scalar_dense`), a data-dependent shape (`nonzero`, boolean masks), a copy to the
host, and a tensor built from Python data on the device (a copy from pageable memory, which
blocks). A CPU tensor mixed into a device tensor fails on meta as it would on CUDA. Each event
is attributed to the train.py line that was running; the lines between the step markers in
train.py's loop must record none. The run stops at the first event after the step, which must be
a log point. The same check runs on attack.pgd and attack.evaluate_pgd. AutoAttack's loops
follow the official algorithm, which reads values on the host by design, and are not checked.

Also: the final evaluation runs in true fp32 (TF32 off), and the gradients stay allocated (DDP's
bucket views) between steps, as the memory plan counts them.
"""
import contextlib
import gc
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental import _config as fx_config
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo_data  # noqa: E402
from attack import evaluate_pgd, pgd  # noqa: E402
from model import create_model  # noqa: E402

TRAIN = ROOT / 'train.py'
STEP_START = '# ---- one optimizer step'
STEP_END = '# ---- the step ends'
DATA_DEPENDENT = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                  torch.ops.aten.masked_select.default, torch.ops.aten.masked_scatter.default,
                  torch.ops.aten._unique2.default}


def step_lines():
    lines = TRAIN.read_text().splitlines()
    start = next(i for i, l in enumerate(lines, 1) if l.strip().startswith(STEP_START))
    end = next(i for i, l in enumerate(lines, 1) if l.strip().startswith(STEP_END))
    return start, end


class Stop(BaseException):  # not an Exception: no handler in train.py may swallow it
    pass


class HostWaits(TorchDispatchMode):
    """Records (what, train.py line or None, innermost project frame) for every operation that makes
    the host wait on a non-CPU device. stop_after: raise Stop at the first event on a train.py line
    past it (the loop's log point), once `armed` says the loop has started."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.events, self.stop_after = [], stop_after
        self._tensor = torch.tensor

    def record(self, what):
        frames = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(str(ROOT))
                  and '/tests/' not in f.filename and '/.venv/' not in f.filename]
        train_line = next((f.lineno for f in frames if f.filename == str(TRAIN)), None)
        where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} {frames[-1].line}" if frames else '?'
        self.events.append((what, train_line, where))
        if self.stop_after is not None and train_line is not None and train_line > self.stop_after:
            raise Stop(where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        if func in DATA_DEPENDENT and devices - {'cpu'}:
            self.record(str(func))
            if func == torch.ops.aten._local_scalar_dense.default:  # no data on meta: any value will do
                return {torch.bool: True}.get(args[0].dtype, 1)
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default) and devices - {'cpu'} and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.record('boolean mask')  # its result's shape is data-dependent
        if func == torch.ops.aten._to_copy.default and devices - {'cpu'} and str(kwargs.get('device')) == 'cpu':
            self.record('copy to the host')
            if 'meta' in devices:  # no data to copy
                return torch.empty(args[0].shape, dtype=kwargs.get('dtype') or args[0].dtype)
        return func(*args, **kwargs)

    def tensor(self, data, *a, device=None, **kw):  # torch.tensor(python data, device=cuda): a blocking copy
        if device is not None and torch.device(device).type != 'cpu':
            self.record('torch.tensor(..., device)')
        return self._tensor(data, *a, device=device, **kw)

    def __enter__(self):
        torch.tensor = self.tensor
        self._nonzero = fx_config.meta_nonzero_assume_all_nonzero
        fx_config.meta_nonzero_assume_all_nonzero = True  # record a data-dependent shape, then go on
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor = self._tensor
        fx_config.meta_nonzero_assume_all_nonzero = self._nonzero
        return super().__exit__(*exc)


def run_train(*argv, modes=(), env=None):
    """train.py with argv in this process, under the dispatch modes; returns its globals, and the
    Stop raised by a HostWaits (None when the run ended)."""
    old_argv, old_cwd, old_sigterm, old_env = sys.argv, os.getcwd(), signal.getsignal(signal.SIGTERM), dict(os.environ)
    sys.argv = ['train.py', *argv]
    os.environ.update(env or {})
    try:
        os.chdir(ROOT)
        with contextlib.ExitStack() as stack:
            for m in modes:
                stack.enter_context(m)
            return runpy.run_path(str(TRAIN), run_name='__main__'), None
    except Stop as e:
        return next(frame.f_globals for frame, _ in traceback.walk_tb(e.__traceback__)
                    if frame.f_code.co_filename == str(TRAIN)), e
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        signal.signal(signal.SIGTERM, old_sigterm)
        os.environ.clear()
        os.environ.update(old_env)


def run_on_meta(tmp_path, *argv, steps=2, batch=8):
    """train.py on the meta device for `steps` steps; returns (events in the step, where it stopped
    after the step, steps done)."""
    start, end = step_lines()
    waits = HostWaits(stop_after=end)
    g, stopped = run_train(*argv, '--device=meta', '--dtype=float32', '--num_workers=0', f'--batch_size={batch}',
                           f'--samples={steps * batch}', '--log_every=1000000', '--eval_every=0', '--ckpt_every=0',
                           f'--out_dir={tmp_path / "run"}', '--overwrite=True', modes=[waits])
    in_step = [e for e in waits.events if e[1] is not None and start < e[1] < end]
    return in_step, str(stopped) if stopped else None, g.get('step')


@pytest.fixture(scope='module')
def clip_run(tmp_path_factory):
    """A tiny real CLIP stage (web shards, frozen random text tower): what TeCoA and FARE start from."""
    demo_data.ensure_demo()
    out = tmp_path_factory.mktemp('clip') / 'clip'
    subprocess.run([sys.executable, 'train.py', 'config/demo_clip.py', '--samples=64', '--batch_size=32',
                    '--final_eval_samples=16', '--eval_samples=16', '--num_workers=0', f'--out_dir={out}'],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return out


@pytest.fixture(scope='module')
def captions(tmp_path_factory):
    import clip_head
    import open_clip_interop
    demo_data.ensure_demo()
    tower = open_clip_interop.load_text_tower('tiny-text-w256', None, seed=0)
    path = tmp_path_factory.mktemp('captions') / 'captions.pt'
    clip_head.precompute_caption_embeddings(tower, str(ROOT / demo_data.DEMO_ROOT / 'shards/train-0000.tar'), str(path))
    return path


DEMO_SHARDS = 'data_cache/demo/shards/train-{0000..0001}.tar'
STAGES = {
    'demo': [],
    'imagefolder_mix_erase': ['--data=imagefolder', '--train_data=data_cache/demo/train',
                              '--val_data=data_cache/demo/val', '--mixup=0.8', '--cutmix=1.0', '--reprob=0.25',
                              "--auto_augment=rand-m9-mstd0.5-inc1"],
    'shards': ['--data=shards', f'--train_data={DEMO_SHARDS}', '--val_data=data_cache/demo/val'],
    'webdataset': ['config/demo_clip.py', f'--train_data={DEMO_SHARDS}'],
    'masking_accumulation_ema': ['--mask_ratio=0.5', '--micro_batch_size=4', '--ema_decay=0.99', '--pgd_steps=2'],
    'block_masking': ['--mask_ratio=0.5', '--mask_kind=block'],
}


@pytest.mark.parametrize('stage', list(STAGES))
def test_training_step_never_waits_on_the_device(stage, tmp_path):
    demo_data.ensure_demo()
    in_step, stopped_at, steps = run_on_meta(tmp_path, *STAGES[stage])
    assert not in_step, f"host waits inside the step: {in_step}"
    assert steps == 2 and stopped_at is not None and 'sums' in stopped_at, (steps, stopped_at)  # the log point


def test_web_stage_with_the_caption_cache_never_waits(captions, tmp_path):
    in_step, stopped_at, steps = run_on_meta(tmp_path, 'config/demo_clip.py', f'--caption_embeddings={captions}',
                                             '--train_data=data_cache/demo/shards/train-0000.tar')
    assert not in_step, f"host waits inside the step: {in_step}"
    assert steps == 2 and 'sums' in stopped_at


@pytest.mark.parametrize('loss', ['tecoa', 'fare'])
def test_clip_fine_tuning_step_never_waits(loss, clip_run, tmp_path):
    in_step, stopped_at, steps = run_on_meta(tmp_path, f'config/demo_{loss}.py', f'--init_from={clip_run}')
    assert not in_step, f"host waits inside the step: {in_step}"
    assert steps == 2 and 'sums' in stopped_at


def test_the_recorder_sees_what_it_claims(tmp_path):
    """The check itself: each kind of host wait on meta is recorded; the same work without one is not."""
    x = torch.rand(4, 3, device='meta')
    with HostWaits() as w:
        x.sum().item(), bool(x.max() > 0), x[x > 0.5], x.cpu(), torch.tensor([1.0], device='meta')
    assert [e[0] for e in w.events] == ['aten._local_scalar_dense.default', 'aten._local_scalar_dense.default',
                                        'boolean mask', 'copy to the host', 'torch.tensor(..., device)']
    with HostWaits() as w:
        (x * 2).sum(), torch.where(x > 0.5, x, 0), x.new_zeros(3).fill_(1.0), torch.ones(3).to('meta')
    assert w.events == []
    with pytest.raises(RuntimeError, match='device'):  # a CPU tensor mixed into device ones fails on meta
        x + torch.ones(4, 3)


def test_pgd_and_evaluate_pgd_wait_only_for_the_final_counts():
    torch.manual_seed(0)
    model = create_model('vit_demo_patch4', img_size=16).to('meta')
    x, y = torch.rand(8, 3, 16, 16, device='meta'), torch.randint(0, 10, (8,), device='meta')
    with HostWaits() as w:
        for norm in ('Linf', 'L2'):
            pgd(model, x, y, lambda out, t: F.cross_entropy(out.float(), t), 8 / 255, 2 / 255, 3, norm)
    assert w.events == []
    loader = [(torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(3)]  # CPU batches, as a loader's
    with HostWaits() as w:
        evaluate_pgd(model, loader, 8 / 255, 3, 1 / 255)
    assert len(w.events) == 1 and 'tolist' in w.events[0][2], w.events


class MatmulTf32(TorchDispatchMode):
    """Records (train.py line, TF32 allowed) for every matrix product."""
    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            line = next((f.lineno for f in traceback.extract_stack() if f.filename == str(TRAIN)), None)
            self.seen.append((line, torch.backends.cuda.matmul.allow_tf32))
        return func(*args, **(kwargs or {}))


def test_final_evaluation_runs_in_true_fp32(tmp_path):
    demo_data.ensure_demo()
    final = next(i for i, l in enumerate(TRAIN.read_text().splitlines(), 1) if 'n_eval = evaluate_pgd(' in l)
    watch = MatmulTf32()
    run_train('--samples=16', '--batch_size=8', '--final_eval_samples=8', '--eval_every=0', '--num_workers=0',
              f'--out_dir={tmp_path}', modes=[watch])
    in_final = [tf32 for line, tf32 in watch.seen if line == final]
    in_training = [tf32 for line, tf32 in watch.seen if line is not None and line < final]
    assert in_final and not any(in_final)  # the fp32 final table: TF32 off...
    assert in_training and all(in_training)  # ...which training turns on
    assert json.loads((tmp_path / 'results.json').read_text())['eval_precision'] == 'fp32 (TF32 off)'


def test_gradients_stay_allocated_between_steps_under_ddp(tmp_path):
    """zero_grad keeps the gradients (DDP's bucket views, also through no_sync micro steps): the
    memory plan counts them once, for the whole run. At the end no process group is left alive
    (one that outlives the interpreter can abort the process after a successful run)."""
    import weakref
    import torch.distributed as dist
    demo_data.ensure_demo()
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    groups, init = [], dist.init_process_group
    dist.init_process_group = lambda *a, **k: (init(*a, **k), groups.append(weakref.ref(dist.group.WORLD)))[0]
    try:
        g, _ = run_train('--samples=16', '--batch_size=8', '--micro_batch_size=4', '--final_eval_samples=8',
                         '--eval_every=0', '--num_workers=0', f'--out_dir={tmp_path}',
                         env=dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)))
    finally:
        dist.init_process_group = init
    assert g['grad_accum'] == 2 and g['ddp']
    grads = [p.grad for p in g['raw_model'].parameters()]
    assert all(t is not None for t in grads) and not any(t.any() for t in grads)  # kept, and zeroed in place
    gc.collect()
    assert len(groups) == 1 and groups[0]() is None  # the run's globals (g) hold no process group


def test_stop_flag_agrees_a_step_late_and_builds_nothing_per_step(tmp_path):
    import torch.distributed as dist
    from distributed import StopFlag
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    built = []
    real_tensor = torch.tensor
    try:
        flag = StopFlag('cpu', ddp=True)
        torch.tensor = lambda *a, **k: built.append(a) or real_tensor(*a, **k)  # Python data -> tensor, per step?
        answers = [flag(local) for local in (False, False, True, False, False)]
    finally:
        torch.tensor = real_tensor
        dist.destroy_process_group()
    assert answers == [False, False, False, True, False]  # SIGTERM in step 3, agreed after step 4
    assert built == []


def test_threads_per_rank_share_this_nodes_cores(monkeypatch):
    from distributed import threads_per_rank
    monkeypatch.setattr(os, 'cpu_count', lambda: 96)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '8')  # 8 GPUs on this node, 16 ranks in all
    assert threads_per_rank(0, num_workers=4, world=16) == 8
    assert threads_per_rank(3, num_workers=4, world=16) == 3
    monkeypatch.delenv('LOCAL_WORLD_SIZE')  # no launcher: the world is this node
    assert threads_per_rank(0, num_workers=2, world=1) == 94
