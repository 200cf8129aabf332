"""
Checkpoint files: written so that a crash, a kill or a full disk never costs the last good
one, and read by one function (train.py, model.model_from_file, eval_autoattack.load_model).

A run's out_dir holds its last `keep` checkpoints as ckpt-<samples seen, 12 digits>.pt.
Writing: temp file, fsync, rename, fsync the folder (a rename is only durable once its
folder is), then drop the oldest. Reading a folder: the newest checkpoint that loads;
an unreadable newest one (half-copied, truncated) falls back to the previous one.
"""
import errno
import glob
import os
import re
import sys

import torch

_NAME = re.compile(r'^ckpt-(\d+)\.pt$')


def checkpoint_files(folder):
    """The run's checkpoints, newest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), f) for f in os.listdir(folder) if (m := _NAME.match(f))]
    return [os.path.join(folder, f) for _, f in sorted(found, reverse=True)]


def _load(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)  # mmap: pages load on use
    except RuntimeError as e:
        if 'mmap' not in str(e):
            raise
        return torch.load(path, map_location='cpu', weights_only=True)  # a legacy (pre-zip) torch file


def read_checkpoint(path):
    """A checkpoint (any torch state-dict file, or a run folder's newest readable one), on the
    CPU and memory-mapped. A user mistake is a one-line SystemExit naming the fix."""
    if os.path.isdir(path):
        files = checkpoint_files(path)
        if not files:
            raise SystemExit(f"no checkpoint in {path} (expected ckpt-<samples>.pt files written by train.py; "
                             f"pass a run's out_dir or a .pt/.pth file)")
        for i, f in enumerate(files):
            try:
                ckpt = _load(f)
            except Exception as e:
                print(f"warning: checkpoint {f} is unreadable ({type(e).__name__}); "
                      f"{'trying the previous one' if i + 1 < len(files) else 'no older one left'}", file=sys.stderr)
                continue
            return ckpt
        raise SystemExit(f"no readable checkpoint in {path}: all {len(files)} are damaged; start the stage "
                         f"again with another out_dir")
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint not found: {path} (pass a run's out_dir or a .pt/.pth file)")
    try:
        return _load(path)
    except Exception as e:
        raise SystemExit(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                         f"(is it a torch state dict saved with torch.save?)")


def remove_temp_files(folder):
    """Half-written checkpoints left by a process killed mid-save."""
    for f in glob.glob(os.path.join(folder, '.ckpt-*.pt.tmp')):
        os.remove(f)


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_nonfinite(params, samples, folder):
    """Stop before NaN/inf weights overwrite the last good checkpoint (one host sync)."""
    if not torch.stack([torch.isfinite(p).all() for p in params]).all():
        raise SystemExit(f"weights are NaN/inf at {samples} samples: not overwriting the last good checkpoint "
                         f"in {folder} (lower lr or check the data)")


def save_checkpoint(obj, folder, samples, keep=2):
    """Write obj as folder/ckpt-<samples>.pt durably, then keep only the newest `keep`.
    On any write error (disk full, quota, I/O) the earlier checkpoints are untouched and the
    run stops with a one-line error."""
    path = os.path.join(folder, f'ckpt-{samples:012d}.pt')
    tmp = os.path.join(folder, f'.ckpt-{samples:012d}.pt.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        why = 'disk full' if e.errno in (errno.ENOSPC, errno.EDQUOT) else os.strerror(e.errno or 0) or str(e)
        kept = ', '.join(os.path.basename(p) for p in checkpoint_files(folder)) or 'none yet'
        raise SystemExit(f"checkpoint at {samples} samples not saved ({why}: {e}); the earlier ones in {folder} "
                         f"are intact ({kept}): free space and run the same command again to resume")
    for old in checkpoint_files(folder)[max(1, keep):]:
        os.remove(old)
    return path
