"""
Benchmarks: every comparison is a ratio measured in this same run (warm-up, repeats,
median), never a wall-clock assert. Prints markdown tables and writes bench.json.

$ python train.py && python train.py config/demo_ft.py   # the demo's robust model (row 3)
$ python bench.py --quick                                 # all CPU rows, about 7.5 min on 2 idle cores
$ python bench.py                                         # full sizes (an hour or more on CPU)
$ python bench.py --rows train,cuda                       # some rows only

Rows:
  train      adversarial training step, images/s: ours (eager, compiled) vs the peer a user
             would otherwise assemble (timm's ViT of the same shape + torchattacks' PGD, eager)
  fast_path  what each optimisation of our step buys (A/B in one process)
  loader     the data loaders alone, images/s per worker = per core (so the GPU never waits on them)
  demo       the README's two demo commands as a user runs them: seconds and accuracy against the
             targets (5 minutes on 2 cores, 78% clean / 50% PGD-20), and against a baseline
  two_stage  the paper's claim at toy scale: the two-stage demo vs one full-resolution
             stage over the same samples (train.py end to end): time ratio, accuracy of both
  autoattack eval_autoattack.py vs the official code (pyautoattack 0.2.0), same model/points
  cuda       (GPU only) img/s, FLOP/s, MFU, memory, largest batch, activation checkpointing,
             AutoAttack points/s on ViT-B/16 (--cuda_rows: chosen rows only)
  joint_clip the CLIP demo with both towers trained vs the frozen random text tower, same
             budget: zero-shot clean / PGD-20, text->image recall@1 clean / PGD-20 (full runs only)
FLOPs: training forward+backward = 3x forward, each attack step = 2x forward (forward plus
the input-only backward); forward = model.flops() (multiply-accumulates) x 2.
"""
import argparse
import ast
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import configurator
import data
import decode
import demo_data
import eval_autoattack as ea
import memplan
import webdata
from attack import pgd, soft_cross_entropy
from model import IMAGENET_MEAN, IMAGENET_STD, PRESETS, create_model

EPS = 4 / 255  # the paper's training eps; the step sizes below follow its recipe


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def median_time(fn, warmup, repeats, device):
    """Median seconds of fn() after warm-up calls (compilation, allocator, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- 1. training step
def attack_step_size(steps):
    return EPS if steps == 1 else 2.5 * EPS / steps  # the paper's PGD-1 step = eps; 2.5 eps / k for PGD-k


def ours_step(name, img_size, steps, batch, device, compiled=False, dtype=None, grad_ckpt=False, freeze_weights=True):
    """train.py's step: PGD on the unwrapped model (input-only gradients), then forward,
    backward, clip, AdamW on the adversarial images."""
    nc = PRESETS[name].get('num_classes', 1000)
    torch.manual_seed(0)
    model = create_model(name, img_size=img_size, grad_ckpt=grad_ckpt).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == 'cuda')
    fast = torch.compile(model) if compiled else model
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    x = torch.rand(batch, 3, img_size, img_size, device=device)
    targets = augment.soft_targets(torch.randint(0, nc, (batch,), device=device), nc, 0.1)
    step_size = attack_step_size(steps)

    def step():
        with autocast:
            x_adv = pgd(fast, x, targets, soft_cross_entropy, EPS, step_size, steps, 'Linf', True, freeze_weights)
            loss = soft_cross_entropy(fast(x_adv), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model


def peer_step(name, img_size, steps, batch, device):
    """What a user would otherwise assemble: timm's VisionTransformer of the same shape
    behind a normalising layer, torchattacks' PGD (random start), CE with label smoothing."""
    import timm.models.vision_transformer as tv
    import torchattacks
    p = {**dict(img_size=224, num_classes=1000), **PRESETS[name]}
    vit = tv.VisionTransformer(img_size=img_size, patch_size=p['patch_size'], embed_dim=p['embed_dim'],
                               depth=p['depth'], num_heads=p['num_heads'], mlp_ratio=p.get('mlp_ratio', 4.0),
                               num_classes=p['num_classes'], global_pool='avg')

    class Normalized(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
            self.vit = vit

        def forward(self, x):
            return self.vit((x - self.mean) / self.std)
    torch.manual_seed(0)
    model = Normalized().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    atk = torchattacks.PGD(model, eps=EPS, alpha=attack_step_size(steps), steps=steps, random_start=True)
    x = torch.rand(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, p['num_classes'], (batch,), device=device)

    def step():
        x_adv = atk(x, y)
        loss = F.cross_entropy(model(x_adv), y, label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model


def bench_train(quick, device):
    """Rows: the demo at both stages, ViT-S/16 and ViT-B/16 at (112, PGD-1) and (224, PGD-3)."""
    rows = [('vit_demo_patch4', 16, 1, 64), ('vit_demo_patch4', 32, 3, 64),
            ('vit_small_patch16', 112, 1, 16), ('vit_small_patch16', 224, 3, 4),
            ('vit_base_patch16', 112, 1, 8), ('vit_base_patch16', 224, 3, 2)]
    warmup, repeats = (0, 2) if quick else (2, 7)  # the first, timed-apart call already warms up
    out = []
    for name, size, steps, batch in rows:
        r = dict(model=name, img_size=size, pgd_steps=steps, batch=batch)
        for label, make in (('peer', lambda: peer_step(name, size, steps, batch, device)),
                            ('ours_eager', lambda: ours_step(name, size, steps, batch, device)),
                            ('ours_compiled', lambda: ours_step(name, size, steps, batch, device, compiled=True))):
            if label == 'ours_compiled' and quick and not name.startswith('vit_demo'):
                continue  # CPU compilation of ViT-S/B takes minutes: --quick compiles the demo rows only
            step, _ = make()
            t_compile = time.perf_counter()
            step()  # first call: compilation happens here
            r[f'{label}_first_call_s'] = time.perf_counter() - t_compile
            r[f'{label}_img_s'] = batch / median_time(step, warmup, repeats, device)
        r['eager_vs_peer'] = r['ours_eager_img_s'] / r['peer_img_s']
        if 'ours_compiled_img_s' in r:
            r['compiled_vs_peer'] = r['ours_compiled_img_s'] / r['peer_img_s']
        out.append(r)
        print(f"  train {name} {size}px PGD-{steps} batch {batch}: peer {r['peer_img_s']:.1f}, "
              f"ours {r['ours_eager_img_s']:.1f} img/s ({r['eager_vs_peer']:.2f}x)"
              + (f", compiled {r['ours_compiled_img_s']:.1f} ({r['compiled_vs_peer']:.2f}x)"
                 if 'compiled_vs_peer' in r else ''), flush=True)
    return out


def bench_fast_path(quick, device, rows=None):
    """What each optimisation of the step buys, A/B in one process, repeats interleaved:
    freezing the weights during the attack (attack.pgd's freeze_weights), eager and compiled;
    and what activation checkpointing (grad_ckpt, for ViT-H/g memory) costs in speed."""
    rows = rows or [('vit_demo_patch4', 16, 1, 64)] + ([] if quick else [('vit_small_patch16', 112, 1, 16)])
    out = []
    for name, size, steps, batch in rows:
        fns = {}
        for compiled in (False, True):
            for freeze in (False, True):
                step, _ = ours_step(name, size, steps, batch, device, compiled=compiled, freeze_weights=freeze)
                step(), step()  # compile and warm up
                fns[(compiled, freeze)] = step
        fns['grad_ckpt'], _ = ours_step(name, size, steps, batch, device, grad_ckpt=True)  # eager, frozen
        times = {k: [] for k in fns}
        for _ in range(3 if quick else 5):
            for k, step in fns.items():
                times[k].append(median_time(step, 0, 3, device))
        rate = {k: batch / statistics.median(v) for k, v in times.items()}
        r = dict(model=name, img_size=size, pgd_steps=steps, batch=batch,
                 **{f"{'compiled' if k[0] else 'eager'}_{'frozen' if k[1] else 'unfrozen'}_img_s": v
                    for k, v in rate.items() if k != 'grad_ckpt'},
                 freeze_speedup_eager=rate[(False, True)] / rate[(False, False)],
                 freeze_speedup_compiled=rate[(True, True)] / rate[(True, False)],
                 grad_ckpt_speed_ratio=rate['grad_ckpt'] / rate[(False, True)])
        out.append(r)
        print(f"  fast path {name} {size}px: freezing weights in the attack x{r['freeze_speedup_eager']:.2f} eager, "
              f"x{r['freeze_speedup_compiled']:.2f} compiled; speed with / without activation checkpointing "
              f"x{r['grad_ckpt_speed_ratio']:.2f}", flush=True)
    return out


# ----------------------------------------------------------------------------- 2. loaders
MAE_AA = 'rand-m9-mstd0.5-inc1'  # the MAE recipe's RandAugment, as the ImageNet configs set it


def photo_tree(root, n, seed=0):
    """n JPEGs in 4 class folders, cut from the real photographs scikit-image's data module and
    scikit-learn ship (varied crops, re-encoded at ImageNet's typical 500x375 or 375x500,
    quality 90): what a loader decodes in practice, not synthetic noise."""
    import numpy as np
    import skimage.data as sk
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photos = [getattr(sk, name)() for name in ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field',
                                               'retina', 'immunohistochemistry', 'camera', 'grass', 'gravel')]
    photos += [sk.stereo_motorcycle()[0]] + list(load_sample_images().images)
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = Image.fromarray(photos[i % len(photos)]).convert('RGB')
        out = (500, 375) if rng.random() < 0.7 else (375, 500)  # ImageNet: mostly landscape
        frac = rng.uniform(0.5, 1.0)  # a varied crop of the photo at the output's aspect ratio
        w = min(im.width, im.height * out[0] / out[1]) * frac ** 0.5
        h = w * out[1] / out[0]
        x0, y0 = rng.uniform(0, im.width - w), rng.uniform(0, im.height - h)
        os.makedirs(os.path.join(root, f'c{i % 4}'), exist_ok=True)
        im.resize(out, Image.BICUBIC, box=(x0, y0, x0 + w, y0 + h)).save(
            os.path.join(root, f'c{i % 4}', f'{i:05d}.jpg'), quality=90)
    return root


def full_decode_mae(size):
    """The baseline: the MAE recipe's timm augmentation on a fully decoded PIL image, float32 out."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T
    return T.Compose([RandomResizedCropAndInterpolation(size, (0.08, 1.0), interpolation='bilinear'),
                      T.RandomHorizontalFlip(), decode._rand_augment(MAE_AA, size, 'bilinear'), T.ToTensor()])


def _folder_loader(root, transform, batch_size):
    """A one-worker ImageFolder loader as data.image_folder_loader builds it, for a transform of PIL images."""
    from torch.utils.data import DataLoader
    ds = data.ImageFolderSafe(root, transform)
    return DataLoader(ds, sampler=data.SampleStream(len(ds), batch_size), batch_size=batch_size,
                      collate_fn=data.collate_skip_bad, num_workers=1, persistent_workers=True, prefetch_factor=4)


def bench_loader(quick):
    """Images per second of one loader worker's CPU time (per core; also per second of wall
    time, which other processes on the machine lower) on real photographs, MAE augmentation:
    a torchvision baseline (full decode, torchvision RandomResizedCrop + RandAugment 2/9,
    float32), the same full decode with the MAE recipe's timm augmentation (float32), and
    ours (decode only what the crop needs, timm augmentation, uint8) from the ImageFolder
    tree and from pre-resized labelled shards (make_shards.py, max side 256). Workers needed
    per GPU = the stage's training img/s per GPU / these rates."""
    from torchvision import transforms as T
    import make_shards
    out = {}
    root = demo_data.ensure_demo()
    tf = decode.train_transform(16, (1.0, 1.0), True)
    out['demo_16px_img_s_per_worker'], out['demo_16px_img_s_per_core'] = _loader_rate(
        lambda: data.image_folder_loader(os.path.join(root, 'train'), tf, 64, num_workers=1), 2048 if quick else 8192)
    n = 256 if quick else 1024
    with tempfile.TemporaryDirectory() as tmp:
        tree = photo_tree(os.path.join(tmp, 'tree'), 128 if quick else 512)
        manifest = make_shards.main([tree, os.path.join(tmp, 'shards'), '--max_side', '256', '--shard_size', '32',
                                     '--workers', '1'])
        for size in (112, 224):
            pipelines = {
                # the torchvision baseline; its bench.json key (and speedup_vs_today_*) is kept: docs name it
                'today_torchvision': lambda: _folder_loader(tree, T.Compose([
                    T.RandomResizedCrop(size, (0.08, 1.0), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                    T.RandomHorizontalFlip(), T.RandAugment(2, 9), T.ToTensor()]), 32),
                'full_decode_mae_float32': lambda: _folder_loader(tree, full_decode_mae(size), 32),
                'new_folder': lambda: data.image_folder_loader(
                    tree, decode.train_transform(size, auto_augment=MAE_AA), 32, num_workers=1),
                'new_shards': lambda: webdata.web_loader(manifest['pattern'], size, 32, num_workers=1, shuffle_buffer=256,
                                                         labelled=True, uint8=True, scale=(0.08, 1.0),
                                                         auto_augment=MAE_AA),
            }
            for name, make_loader in pipelines.items():
                out[f'{name}_{size}px_img_s_per_worker'], out[f'{name}_{size}px_img_s_per_core'] = \
                    _loader_rate(make_loader, n)
            out[f'speedup_{size}'] = out[f'new_folder_{size}px_img_s_per_core'] / out[f'full_decode_mae_float32_{size}px_img_s_per_core']
            out[f'speedup_vs_today_{size}'] = out[f'new_folder_{size}px_img_s_per_core'] / out[f'today_torchvision_{size}px_img_s_per_core']
        for size in (112, 84):  # the web stages' recipe (CLIPA: crop scale (0.9, 1), no RandAugment), same shards
            out[f'web_recipe_shards_{size}px_img_s_per_worker'], out[f'web_recipe_shards_{size}px_img_s_per_core'] = \
                _loader_rate(lambda: webdata.web_loader(manifest['pattern'], size, 32, num_workers=1, shuffle_buffer=256,
                                                        labelled=True, uint8=True, scale=(0.9, 1.0)), n)
        out.update(decode_floor(tree, 112))
        # the most any JPEG pipeline with this augmentation could gain over a full-decode baseline worker
        out['speedup_bound_112'] = 1e3 / out['full_decode_mae_float32_112px_img_s_per_core'] / (
            out['ms_decode_eighth_112px'] + out['ms_rand_augment_112px'])
    print('  loaders: ' + ', '.join(f'{k} {v:.2f}' for k, v in out.items()), flush=True)
    return out


def decode_floor(tree, size, repeats=3):
    """Per-image CPU ms, in this process, of what bounds any JPEG pipeline with the same
    augmentation: decoding at 1/8 scale down to the crop's last row (libjpeg still
    entropy-decodes every coefficient above it, so no DCT scaling goes below that) and timm's
    RandAugment at `size`; and both whole pipelines (one thread, as in a loader worker)."""
    import io
    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(tree) for f in fs)
    blobs = [open(p, 'rb').read() for p in paths]
    ra = decode._rand_augment(MAE_AA, size, 'bilinear')
    small = [Image.open(io.BytesIO(b)).convert('RGB').resize((size, size)) for b in blobs]
    baseline = full_decode_mae(size)

    def entropy_floor(i):  # the crop load_train_image(blobs[i], i, ...) draws
        decode.seed_sample(i)
        im = Image.open(io.BytesIO(blobs[i]))
        top, _, h, _ = RandomResizedCropAndInterpolation.get_params(im, (0.08, 1.0), (3 / 4, 4 / 3))
        height = im.height
        im.draft('RGB', (im.width // 8, im.height // 8))
        decode.load_rows(im, math.ceil((top + h) * im.height / height))

    cases = {'full_decode_mae_float32': lambda i: baseline(Image.open(io.BytesIO(blobs[i])).convert('RGB')),
             'new': lambda i: decode.load_train_image(blobs[i], i, size, auto_augment=MAE_AA),
             # the same without the stop at the crop's last row: a byte after the end marker decodes it whole
             'new_whole_file': lambda i: decode.load_train_image(blobs[i] + b'\0', i, size, auto_augment=MAE_AA),
             'decode_full': lambda i: Image.open(io.BytesIO(blobs[i])).load(),
             'decode_eighth': entropy_floor,
             'rand_augment': lambda i: ra(small[i])}
    ms, threads = {k: [] for k in cases}, torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker: ToTensor's small ops would otherwise spin a thread pool
    for _ in range(repeats):  # interleaved, best of repeats: the machine's noise hits every case alike
        for k, fn in cases.items():
            t = time.thread_time()
            for i in range(len(blobs)):
                fn(i)
            ms[k].append(1e3 * (time.thread_time() - t) / len(blobs))
    torch.set_num_threads(threads)
    return {f'ms_{k}_{size}px': min(v) for k, v in ms.items()}


def pillow_build():
    """'Pillow 13.0.0' or 'Pillow-SIMD 12.1.1.post0': the loader's speed depends on which."""
    import importlib.metadata as md
    import PIL
    try:
        md.distribution('pillow-simd')
        return f'Pillow-SIMD {PIL.__version__}'
    except md.PackageNotFoundError:
        return f'Pillow {PIL.__version__}'


def child_pids(parent=None):
    """The pids of the children of `parent` (default: this process), from Linux's /proc."""
    me, out = str(parent or os.getpid()), []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            if open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1] == me:  # field 4: the parent
                out.append(int(pid))
        except OSError:
            pass
    return out


def _cpu_seconds(pids):
    """User + system CPU seconds the processes have used (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
            total += (int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK')
        except (OSError, ValueError):
            pass
    return total


def _loader_rate(make_loader, n):
    """(images/s of wall time, images per CPU-second of the worker): with one worker the second
    is the per-core rate even when other processes share the cores. Only this loader's own worker
    is billed, and it is shut down before the next loader starts: a worker left alive goes on
    prefetching, and its CPU time would be counted against the next loader's images."""
    before = set(child_pids())
    it = iter(make_loader())
    next(it)  # worker start-up
    workers = set(child_pids()) - before
    t0, c0, seen = time.perf_counter(), _cpu_seconds(workers), 0
    while seen < n:
        seen += len(next(it)[0])
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(workers) - c0
    del it  # the last reference to the loader: its worker is stopped and joined
    return seen / wall, (seen / cpu if cpu > 0 else float('nan'))


# ----------------------------------------------------------------------------- 3. two stages vs one
def run_stage(args, out_dir):
    cmd = [sys.executable, 'train.py', *args, f'--out_dir={out_dir}', '--overwrite=True']  # a fresh run every time
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    res = json.load(open(os.path.join(out_dir, 'results.json')))
    res['process_s'] = time.time() - t0
    return res


DEMO_BUDGET_KEYS = ('samples', 'warmup_samples', 'eps_warmup', 'eval_every', 'log_every')


def demo_budgets():
    """The demo's budgets as its files set them: stage 1 (train.py's defaults, read from its
    source: importing it would run a stage), stage 2 (config/demo_ft.py) and the one-stage
    control (config/demo_onestage.py over train.py's defaults)."""
    tree = ast.parse(open('train.py').read())
    pre = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
           for t in n.targets if isinstance(t, ast.Name) and t.id in DEMO_BUDGET_KEYS}
    return (pre, configurator.read_config('config/demo_ft.py'),
            {**pre, **configurator.read_config('config/demo_onestage.py')})


def bench_two_stage(quick):
    """train.py end to end: `python train.py && python train.py config/demo_ft.py` against
    config/demo_onestage.py (32 px for the same samples). --quick: 1/32 of the budget
    (the time ratio holds; the accuracies of so short a run mean little)."""
    f = 32 if quick else 1
    scale = lambda budget, *keys: [f'--{k}={int(budget[k] / f)}' for k in keys]
    pre_b, ft_b, one_b = demo_budgets()
    ev = [f'--final_eval_samples={200 if quick else 500}', '--eval_every=0']  # time training, not evaluations
    pre = run_stage(scale(pre_b, 'samples', 'warmup_samples', 'eps_warmup', 'log_every') + ev, 'out/bench_two_stage_pre')
    ft = run_stage(['config/demo_ft.py', '--init_from=out/bench_two_stage_pre']
                   + scale(ft_b, 'samples', 'warmup_samples', 'log_every') + ev, 'out/bench_two_stage_ft')
    one = run_stage(['config/demo_onestage.py'] + scale(one_b, 'samples', 'warmup_samples', 'eps_warmup', 'log_every')
                    + ev, 'out/bench_one_stage')
    two_s = pre['train_s'] + ft['train_s']
    r = dict(budget_fraction=1 / f, two_stage_train_s=two_s, one_stage_train_s=one['train_s'],
             two_stage_time_ratio=one['train_s'] / two_s,
             two_stage_compute_ratio=one['compute_1e10'] / ft['compute_1e10'],
             two_stage_clean=ft['clean_acc'], two_stage_pgd20=ft['pgd20_acc'],
             one_stage_clean=one['clean_acc'], one_stage_pgd20=one['pgd20_acc'],
             stage1_clean=pre['clean_acc'], stage1_pgd20=pre['pgd20_acc'], eval_images=ft['eval_images'])
    print(f"  two-stage {two_s:.0f} s vs one-stage {one['train_s']:.0f} s of training "
          f"({r['two_stage_time_ratio']:.2f}x)", flush=True)
    return r


DEMO_TARGETS = dict(seconds=300, clean=78.0, pgd20=50.0)  # both stages on 2 cores; stage 2 on 500 val images


def bench_demo(quick):
    """The README's first command as a user runs it, nothing overridden but out_dir: `python train.py`
    then `python train.py config/demo_ft.py`. Each stage's process seconds (start-up, training and
    its evaluations) and stage 2's clean / PGD-20 on 500 val images, against DEMO_TARGETS. The
    baseline, in the same run (full runs only): the same stages with one loader worker (so one
    core computes) and stage 2's PGD-20 evaluations every 2000 samples. --quick: 1/32 of the
    budget and 200 val images, no baseline (the accuracies of so short a run mean little)."""
    f = 32 if quick else 1
    scale = lambda budget, *keys: [f'--{k}={int(budget[k] / f)}' for k in keys] if quick else []
    pre_b, ft_b, _ = demo_budgets()
    pre_scale = scale(pre_b, 'samples', 'warmup_samples', 'eps_warmup', 'eval_every')
    ft_scale = scale(ft_b, 'samples', 'warmup_samples') + (['--final_eval_samples=200'] if quick else [])
    variants = {'demo': ([], [])}
    if not quick:
        variants['baseline'] = (['--num_workers=1'], ['--num_workers=1', '--eval_every=2000'])
    r = dict(budget_fraction=1 / f, targets=DEMO_TARGETS)
    for name, (pre_args, ft_args) in variants.items():
        pre = run_stage(pre_scale + pre_args, f'out/bench_demo_{name}_pre')
        ft = run_stage(['config/demo_ft.py', f'--init_from=out/bench_demo_{name}_pre'] + ft_scale + ft_args,
                       f'out/bench_demo_{name}_ft')
        r[name] = dict(stage1_s=pre['process_s'], stage2_s=ft['process_s'], total_s=pre['process_s'] + ft['process_s'],
                       train_s=pre['train_s'] + ft['train_s'], stage1_clean=pre['clean_acc'],
                       stage1_pgd20=pre['pgd20_acc'], clean=ft['clean_acc'], pgd20=ft['pgd20_acc'],
                       eval_images=ft['eval_images'])
        print(f"  demo {name}: {r[name]['total_s']:.0f} s, {r[name]['clean']:.1f} / {r[name]['pgd20']:.1f}", flush=True)
    d = r['demo']
    r['meets_targets'] = not quick and d['total_s'] <= DEMO_TARGETS['seconds'] and \
        d['clean'] >= DEMO_TARGETS['clean'] and d['pgd20'] >= DEMO_TARGETS['pgd20']
    if 'baseline' in r:
        r['speedup_vs_baseline'] = r['baseline']['total_s'] / d['total_s']
    return r


def val_caption_pairs(img_size, n):
    """The first n (image, caption) pairs of the demo's val shard, images as val_transform makes them."""
    import io
    import data
    import demo_data
    import webdata
    from PIL import Image
    tf = data.val_transform(img_size, 1.0, 'bilinear')
    pairs = [(tf(Image.open(io.BytesIO(s['jpg'])).convert('RGB')), s['txt'].decode())
             for _, s in webdata.iter_tar_samples(f'{demo_data.DEMO_ROOT}/shards/val-0000.tar', wanted=set(range(n)))]
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def clip_towers(out_dir):
    """A CLIP run's image tower and its text tower: the trained one (joint runs) or the frozen one."""
    from checkpoint import read_checkpoint
    from model import model_from_file
    from open_clip_interop import load_text_tower
    ckpt = read_checkpoint(out_dir)
    cfg = ckpt['config']
    tower = load_text_tower(cfg['text_tower'], cfg['text_pretrained'] or None, seed=cfg['text_seed'])
    if ckpt.get('text_model') is not None:
        tower.clip.load_state_dict(ckpt['text_model'])
    return model_from_file(out_dir).eval(), tower


def bench_joint_clip(quick, n=500):
    """config/demo_clip_joint.py (both towers trained) beside config/demo_clip.py (frozen random text
    tower), same budget: zero-shot clean / PGD-20 at 8/255 on n val images (results.json), and
    text -> image retrieval recall@1 on the val captions, clean and under PGD-20 at 8/255.
    --quick: 1/16 of the budget (a smoke run: its accuracies mean little)."""
    from clip_head import retrieval_recall_at_1
    f = 16 if quick else 1
    budget = [f'--samples={60000 // f}', f'--warmup_samples={2000 // f}', f'--eps_warmup={10000 // f}',
              f'--log_every={4000 // f}', f'--final_eval_samples={n}', '--overwrite=True']
    out = {}
    for name, cfg in (('frozen_text', 'config/demo_clip.py'), ('joint', 'config/demo_clip_joint.py')):
        res = run_stage([cfg, *budget], f'out/bench_clip_{name}')
        image, tower = clip_towers(f'out/bench_clip_{name}')
        x, caps = val_caption_pairs(image.config.img_size, n)
        torch.manual_seed(0)
        out[name] = dict(zero_shot_clean=res['clean_acc'], zero_shot_pgd20=res['pgd20_acc'], train_s=res['train_s'],
                         recall1_clean=retrieval_recall_at_1(image, tower, x, caps),
                         recall1_pgd20=retrieval_recall_at_1(image, tower, x, caps, eps=8 / 255))
        print(f"  {name}: zero-shot {res['clean_acc']:.1f} / {res['pgd20_acc']:.1f}, text->image R@1 "
              f"{out[name]['recall1_clean']:.1f} / {out[name]['recall1_pgd20']:.1f} (clean / PGD-20), "
              f"{res['train_s']:.0f} s", flush=True)
    out.update(budget_fraction=1 / f, images=n)
    return out


# ----------------------------------------------------------------------------- 4. AutoAttack
def official_autoattack(model, x, y, norm, eps, seed, bs, version='standard', attacks=None):
    """pyautoattack's run: robust mask and its per-attack cumulative robust accuracy."""
    from pyautoattack import AutoAttack
    aa = AutoAttack(model, norm=norm, eps=eps, version=version, attacks=attacks, seed=seed, device=str(x.device))
    lines = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    # the official code reports per-attack results only through the global 'auto-attack' logger,
    # which another user of pyautoattack may have silenced
    aa.logger.addHandler(handler)
    aa.logger.setLevel(logging.DEBUG)
    aa.logger.propagate, aa.logger.disabled = False, False
    t0 = time.time()
    try:
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=bs)
    finally:
        aa.logger.removeHandler(handler)
    seconds = time.time() - t0
    found = [m for m in (re.match(r'robust accuracy after (\S+): ([\d.]+)% \(total time ([\d.]+) s', l)
                         for l in lines) if m]
    per_attack = {m.group(1): float(m.group(2)) for m in found}
    elapsed = {m.group(1): float(m.group(3)) for m in found}
    return y_adv == y, per_attack, elapsed, seconds


def bench_autoattack(model, x, y, desc, norm, eps, seed=0, bs=250, device=None, version='standard', attacks=None):
    device = device or x.device
    x, y = x.to(device), y.to(device)
    sync(device)
    t0 = time.time()
    ours = ea.evaluate(model, x, y, norm=norm, eps=eps, seed=seed, batch_size=bs, log=lambda *a: None,
                       version=version, attacks=attacks)
    sync(device)
    ours_s = time.time() - t0
    ref_robust, ref_per_attack, ref_elapsed, ref_s = official_autoattack(model, x, y, norm, eps, seed, bs, version,
                                                                         attacks)
    diff = int((ours['robust'].cpu() != ref_robust.cpu()).sum())
    nan = float('nan')  # the official code logs nothing once no point is left
    rows = [(name.upper(), ours['per_attack'][name], ref_per_attack.get(name.upper(), nan),
             ours['elapsed_s'].get(name, nan), ref_elapsed.get(name.upper(), nan)) for name in ours['per_attack']]
    r = {'points': desc, 'version': version if not attacks else f"{version} ({', '.join(attacks)})",
         'norm': norm, 'eps': eps, 'ours_s': ours_s, 'official_s': ref_s,
         'speedup': ref_s / ours_s, 'diff_points': diff, 'clean_acc': ours['clean_acc'], 'per_attack': rows}
    print(f"  AutoAttack {desc}: ours {ours_s:.0f} s, official {ref_s:.0f} s ({r['speedup']:.2f}x), "
          f"{diff} points judged differently", flush=True)
    return r


def bench_autoattack_demo(ckpt, n, norm, eps):
    """The standard version on the demo's adversarially trained model, and on the undefended
    control if it exists. Robust points dominate the time (FAB-T and Square run on them)."""
    version, attacks = 'standard', None
    out = {}
    for label, path in (('robust', ckpt), ('undefended', 'out/demo_plain_ft')):
        if not os.path.exists(path):
            print(f"  AutoAttack: no {path}; skipped (run the demo first)")
            continue
        model = ea.load_model(path)
        x, y, desc = ea.load_demo_val(model.config.img_size, n)
        out[label] = {'model': path, **bench_autoattack(model, x, y, desc, norm, eps, version=version, attacks=attacks)}
    return out


# ----------------------------------------------------------------------------- 5. CUDA
def matmul_flops(device, n=8192, dtype=torch.bfloat16):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / median_time(lambda: a @ b, 3, 10, device)


def largest_batch(name, size, steps, device, dtype, start=16, limit=2048):
    """Doubling search for the largest batch whose training step fits in memory."""
    best, b = 0, start
    while b <= limit:
        try:
            step, model = ours_step(name, size, steps, b, device, compiled=False, dtype=dtype)
            step()
            best = b
            b *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            step = model = None
            torch.cuda.empty_cache()
    return best


def parse_cuda_rows(spec):
    """'vit_base_patch16:112:1:256:compile,...' -> [(name, size, pgd steps, batch, compiled)]."""
    rows = []
    for r in spec.split(','):
        name, size, steps, batch, *how = r.split(':')
        rows.append((name, int(size), int(steps), int(batch), how != ['eager']))
    return rows


def bench_cuda(quick, device, peak_flops, rows=None, extras=True):
    """bf16 (+ compile); FLOPs per image = 2 x forward MACs x (3 + 2 x PGD steps). extras: also
    activation checkpointing's cost on the last row and AutoAttack's speed on ViT-B/16."""
    dtype = torch.bfloat16
    rows = rows or [('vit_base_patch16', 112, 1, 256, True), ('vit_base_patch16', 224, 3, 128, True),
                    ('vit_large_patch16', 112, 1, 128, True), ('vit_large_patch16', 224, 3, 64, True),
                    ('vit_huge_patch14', 84, 2, 128, True), ('vit_huge_patch14', 224, 3, 32, True)]
    matmul = matmul_flops(device) if device.type == 'cuda' else float('nan')
    out = {'matmul_flops': matmul, 'peak_flops': peak_flops, 'rows': []}
    for name, size, steps, batch, compiled in rows:
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        step, model = ours_step(name, size, steps, batch, device, compiled=compiled, dtype=dtype)
        t = median_time(step, 3 if not quick else 2, 10 if not quick else 3, device)
        fwd = model.flops(size)
        flops = 2 * fwd * (3 + 2 * steps) * batch / t
        r = dict(model=name, img_size=size, pgd_steps=steps, batch=batch, compiled=compiled, img_s=batch / t, model_flops=flops,
                 mfu_vs_peak=flops / peak_flops, mfu_vs_matmul=flops / matmul)
        # the dry run's memory plan for this step (one GPU, no EMA) beside what CUDA measured
        r['plan_peak_gib'] = memplan.memory_plan(asdict(model.config), batch, size, steps, dtype='bfloat16')['peak'] / 2 ** 30
        if device.type == 'cuda':
            r['measured_peak_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
            r['peak_mem_gib_per_img'] = r['measured_peak_gib'] / batch
            del step, model
            torch.cuda.empty_cache()
            r['largest_batch'] = largest_batch(name, size, steps, device, dtype, start=batch, limit=8192)
        out['rows'].append(r)
        print(f"  cuda {name} {size}px PGD-{steps}: {r['img_s']:.0f} img/s, MFU {100 * r['mfu_vs_peak']:.1f}% "
              f"of peak, {100 * r['mfu_vs_matmul']:.1f}% of matmul", flush=True)
    if not extras:
        return out
    # activation checkpointing: its cost in speed and what it saves in memory (the largest model)
    name, size, steps, batch, _ = rows[-1]
    ckpt = {}
    for on in (False, True):
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        step, _ = ours_step(name, size, steps, batch, device, compiled=True, dtype=dtype, grad_ckpt=on)
        ckpt[on] = (batch / median_time(step, 2, 3, device),
                    torch.cuda.max_memory_allocated() / batch / 2 ** 30 if device.type == 'cuda' else float('nan'))
        del step
    out['grad_ckpt'] = dict(model=name, img_size=size, speed_ratio=ckpt[True][0] / ckpt[False][0],
                            memory_ratio=ckpt[True][1] / ckpt[False][1])
    # AutoAttack points/s on ViT-B/16 (random weights: the same work per point as a trained one
    # only for points never broken, so this is a speed figure, not a robustness one)
    if device.type == 'cuda':
        torch.manual_seed(0)
        vitb = create_model('vit_base_patch16').to(device).eval().requires_grad_(False)
        x = torch.rand(64 if quick else 256, 3, 224, 224, device=device)
        y = vitb(x).argmax(1)  # every point correct, so every point is attacked
        out['autoattack_vitb'] = bench_autoattack(vitb, x, y, f'{len(x)} random images', 'Linf', EPS, device=device)
    return out


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description='nanoAdvXL benchmarks')
    ap.add_argument('--quick', action='store_true', help='small sizes: all CPU rows within ~10 minutes on 2 cores')
    ap.add_argument('--rows', default='', help='comma-separated subset (default: all; --quick leaves out fast_path)')
    ap.add_argument('--ckpt', default='out/demo_ft', help='robust model for the AutoAttack row (the demo)')
    ap.add_argument('--n', type=int, default=0, help='AutoAttack points (default 10 with --quick, else 100)')
    ap.add_argument('--peak_flops', type=float, default=989e12, help='GPU dense bf16 peak (H100/H200 SXM)')
    ap.add_argument('--cuda_rows', default='', help="only these cuda rows, e.g. vit_base_patch16:112:1:256,"
                    "vit_huge_patch14:84:2:128:eager (model:px:PGD steps:batch[:eager])")
    ap.add_argument('--out', default='bench.json')
    args = ap.parse_args()
    rows = args.rows.split(',') if args.rows else \
        ['train', 'loader', 'demo', 'two_stage', 'autoattack', 'cuda'] + ([] if args.quick else ['fast_path', 'joint_clip'])
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    cpu = torch.device('cpu')
    info = dict(date=time.strftime('%Y-%m-%d'), quick=args.quick, torch=torch.__version__, pillow=pillow_build(),
                cpu_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                gpu=torch.cuda.get_device_name() if device.type == 'cuda' else None)
    res = {'info': info}
    print(f"nanoAdvXL bench {info}", flush=True)
    if 'train' in rows:
        res['train'] = bench_train(args.quick, cpu)
        res['train_step_vs_peer_min'] = min(r['eager_vs_peer'] for r in res['train'])
    if 'fast_path' in rows:
        res['fast_path'] = bench_fast_path(args.quick, cpu)
    if 'loader' in rows:
        res['loader'] = bench_loader(args.quick)
        res['loader_speedup_112'] = res['loader']['speedup_112']  # new ImageFolder pipeline / full decode, same aug
        res['loader_img_s_per_core_112_shards'] = res['loader']['new_shards_112px_img_s_per_core']
        res['loader_speedup_112_bound'] = res['loader']['speedup_bound_112']  # the most any JPEG decoder could give
    if 'demo' in rows:
        res['demo'] = bench_demo(args.quick)
        res['demo_total_s'] = res['demo']['demo']['total_s']
    if 'two_stage' in rows:
        res['two_stage'] = bench_two_stage(args.quick)
        res['two_stage_time_ratio'] = res['two_stage']['two_stage_time_ratio']
    if 'joint_clip' in rows:
        res['joint_clip'] = bench_joint_clip(args.quick)
    if 'autoattack' in rows:
        res['autoattack'] = bench_autoattack_demo(args.ckpt, args.n or (10 if args.quick else 100), 'Linf', 8 / 255)
        if 'robust' in res['autoattack']:
            res['autoattack_speedup_vs_official'] = res['autoattack']['robust']['speedup']
            res['autoattack_max_diff_points'] = max(r['diff_points'] for r in res['autoattack'].values())
    if 'cuda' in rows and device.type == 'cuda':
        res['cuda'] = bench_cuda(args.quick, device, args.peak_flops,
                                 parse_cuda_rows(args.cuda_rows) if args.cuda_rows else None, extras=not args.cuda_rows)
    print_tables(res)
    with open(args.out, 'w') as f:
        json.dump(res, f, indent=2)
    print(f"\nwrote {args.out}")


def print_tables(res):
    i = res['info']
    print(f"\n## nanoAdvXL bench, {i['date']}, {i['gpu'] or 'CPU'} ({i['cpu_threads']} threads), "
          f"{'--quick' if i['quick'] else 'full'}")
    if 'train' in res:
        print("\n| adversarial training step | batch | peer img/s | ours eager | ours compiled | eager/peer | compiled/peer |")
        print("|---|---|---|---|---|---|---|")
        for r in res['train']:
            c = r.get('ours_compiled_img_s')
            c_img, c_ratio = (f"{c:.2f}", f"{r['compiled_vs_peer']:.2f}") if c else ('-', '-')
            print(f"| {r['model']} {r['img_size']}px PGD-{r['pgd_steps']}{'' if r['compiled'] else ' (eager)'} | {r['batch']} | {r['peer_img_s']:.2f} | "
                  f"{r['ours_eager_img_s']:.2f} | {c_img} | {r['eager_vs_peer']:.2f} | {c_ratio} |")
        print(f"\ntrain_step_vs_peer_min = {res['train_step_vs_peer_min']:.2f}")
    for r in res.get('fast_path', []):
        print(f"\n| {r['model']} {r['img_size']}px PGD-{r['pgd_steps']}, img/s | weights frozen in the attack | "
              f"not frozen | speed-up |\n|---|---|---|---|")
        for mode in ('eager', 'compiled'):
            print(f"| {mode} | {r[f'{mode}_frozen_img_s']:.1f} | {r[f'{mode}_unfrozen_img_s']:.1f} | "
                  f"{r[f'freeze_speedup_{mode}']:.2f} |")
        print(f"\nactivation checkpointing (eager): speed with / without x{r['grad_ckpt_speed_ratio']:.2f}")
    if 'loader' in res:
        L = res['loader']
        print(f"\n| loader, 1 worker: img per CPU-s (per s of wall time) | 112 px | 224 px |\n|---|---|---|\n"
              f"| demo 32 px PNG -> 16 px | {L['demo_16px_img_s_per_core']:.0f} ({L['demo_16px_img_s_per_worker']:.0f}) | |")
        for name in ('today_torchvision', 'full_decode_mae_float32', 'new_folder', 'new_shards'):
            print(f"| {name} | " + ' | '.join(f"{L[f'{name}_{s}px_img_s_per_core']:.0f} ({L[f'{name}_{s}px_img_s_per_worker']:.0f})"
                                             for s in (112, 224)) + " |")
        print(f"| web recipe (crop (0.9, 1), no RandAugment), shards; 84 px in the 224 px column | "
              + ' | '.join(f"{L[f'web_recipe_shards_{s}px_img_s_per_core']:.0f} "
                           f"({L[f'web_recipe_shards_{s}px_img_s_per_worker']:.0f})" for s in (112, 84)) + " |")
        print(f"\nloader_speedup_112 = {L['speedup_112']:.2f} (224 px: {L['speedup_224']:.2f}; vs the torchvision "
              f"baseline {L['speedup_vs_today_112']:.2f} / {L['speedup_vs_today_224']:.2f}), "
              f"loader_img_s_per_core_112_shards = {L['new_shards_112px_img_s_per_core']:.0f}")
        print("in-process ms per image at 112 px: " + ', '.join(
            f"{k} {L[f'ms_{k}_112px']:.3f}" for k in ('full_decode_mae_float32', 'new', 'new_whole_file', 'decode_full',
                                                       'decode_eighth', 'rand_augment'))
              + f"; loader_speedup_112_bound = {L['speedup_bound_112']:.2f}")
    if 'demo' in res:
        d, T = res['demo'], res['demo']['targets']
        print(f"\n| the demo's two commands, {d['budget_fraction']:g} of the budget | stage 1 s | stage 2 s | total s | "
              f"clean | PGD-20 |\n|---|---|---|---|---|---|")
        for name in ('demo', 'baseline'):
            if name in d:
                r = d[name]
                print(f"| {name} | {r['stage1_s']:.0f} | {r['stage2_s']:.0f} | {r['total_s']:.0f} | {r['clean']:.1f} | "
                      f"{r['pgd20']:.1f} |")
        print(f"\ntargets: at most {T['seconds']} s, at least {T['clean']:g}% clean and {T['pgd20']:g}% PGD-20 on "
              f"{d['demo']['eval_images']} val images: "
              f"{'not judged at this budget' if d['budget_fraction'] < 1 else 'met' if d['meets_targets'] else 'not met'}"
              + (f"; speed-up vs baseline {d['speedup_vs_baseline']:.2f}x" if 'speedup_vs_baseline' in d else ''))
    if 'two_stage' in res:
        t = res['two_stage']
        print(f"\n| demo, {t['budget_fraction']:g} of the budget | training s | clean | PGD-20 |\n|---|---|---|---|")
        print(f"| two stages (16 px, then 32 px; PGD-1) | {t['two_stage_train_s']:.0f} | {t['two_stage_clean']:.1f} | "
              f"{t['two_stage_pgd20']:.1f} |")
        print(f"| one stage (32 px, PGD-1) | {t['one_stage_train_s']:.0f} | {t['one_stage_clean']:.1f} | "
              f"{t['one_stage_pgd20']:.1f} |")
        print(f"\ntwo_stage_time_ratio = {t['two_stage_time_ratio']:.2f} (compute ratio by the paper's "
              f"convention {t['two_stage_compute_ratio']:.2f}), {t['eval_images']} val images")
    for label, a in res.get('autoattack', {}).items():
        print(f"\n| AutoAttack {a['version']}, {label} model, {a['points']}, {a['norm']} {a['eps'] * 255:g}/255 | ours | "
              f"official | ours s | official s |\n|---|---|---|---|---|")
        print(f"| clean | {a['clean_acc']:.1f}% | | | |")
        fmt = lambda v, f: '-' if v != v else f.format(v)
        for name, x, y, xs, ys in a['per_attack']:  # seconds: cumulative, from the start of the run
            print(f"| after {name} | {x:.1f}% | {fmt(y, '{:.1f}%')} | {fmt(xs, '{:.1f}')} | {fmt(ys, '{:.1f}')} |")
        print(f"| wall time | | | {a['ours_s']:.1f} | {a['official_s']:.1f} |")
        print(f"\nspeed-up {a['speedup']:.2f}x, points judged differently: {a['diff_points']}")
    if 'cuda' in res:
        c = res['cuda']
        print(f"\n| {i['gpu']}, bf16 | batch | img/s | TFLOP/s | MFU (peak) | MFU (matmul) | GiB/img | "
              f"peak GiB: planned / measured | largest batch |\n|---|---|---|---|---|---|---|---|---|")
        for r in c['rows']:
            print(f"| {r['model']} {r['img_size']}px PGD-{r['pgd_steps']}{'' if r['compiled'] else ' (eager)'} | {r['batch']} | {r['img_s']:.0f} | "
                  f"{r['model_flops'] / 1e12:.0f} | {100 * r['mfu_vs_peak']:.1f}% | {100 * r['mfu_vs_matmul']:.1f}% | "
                  f"{r.get('peak_mem_gib_per_img', float('nan')):.3f} | "
                  f"{r['plan_peak_gib']:.1f} / {r.get('measured_peak_gib', float('nan')):.1f} | "
                  f"{r.get('largest_batch', '-')} |")
        g = c.get('grad_ckpt')
        print(g and f"\nactivation checkpointing on {g['model']} at {g['img_size']}px: speed x{g['speed_ratio']:.2f}, "
              f"memory x{g['memory_ratio']:.2f}" or '')


if __name__ == '__main__':
    main()
