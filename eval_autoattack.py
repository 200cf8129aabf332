"""
AutoAttack evaluation of a model: the command line and evaluate(), over the attacks of
autoattack.py (the port of the official code).

    python eval_autoattack.py --ckpt out/ckpt.pt                          # demo val, L_inf 4/255
    python eval_autoattack.py --ckpt advxl_vith14.pt --arch vit_huge_patch14 --data /imagenet
    torchrun --nproc_per_node 8 eval_autoattack.py --ckpt ... --norm L2   # sharded over ranks
    python eval_autoattack.py --ckpt ... --data /imagenet --dry_run       # model, data, batch; no attack

Under torchrun, rank r evaluates the points r, r + world, ... from start to end on its own, as
the official multi-GPU AdvXL evaluation does, and keeps its own resume file; the ranks meet once,
at the end. The batch (--bs 0) is the official 250 where the memory plan fits it on the device,
else the largest that fits; an out-of-memory error halves it for the rest of the run.

Same random streams as the official evaluation (the global RNG re-seeded for every attack on
every batch, as the official code does): on the test models every attack finds exactly the
official set of robust points. What differs makes it faster, never changes a verdict:
- the attacks' own shortcuts (autoattack.py: fooled points leave the batch, targets batched);
- the clean logits are computed once (the official code recomputes them inside every attack),
  and the final label check runs only on the points an attack claims to have fooled;
- opt-in, and reported as non-standard: --compile, --bf16.
On the points no attack breaks, the forward and backward passes are the official ones, pass
for pass: the time saved is where points get fooled, or where batching fills an idle device.
Worst case over attacks: each attack runs only on the points still robust; robust accuracy
is counted over all points (a misclassified clean point is never robust).
"""
import argparse
import datetime
import json
import math
import os
import time
from collections import OrderedDict
from contextlib import nullcontext

import torch
import torch.distributed as dist

import attack
import clip_head
import data  # imports timm, which keeps a reference to the default process group if it exists then: import first
import demo_data
import memplan
import model as model_lib
import open_clip_interop
from autoattack import _flat_norm, attack_config, check_model, run_attack
from distributed import init_distributed, leave_distributed

DEFAULT_EPS = {'Linf': 4 / 255, 'L2': 2.0, 'L1': 75.0}


# ----------------------------------------------------------------------------- state, ranks, memory
def _save_atomic(obj, path):
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save(obj, tmp)
    os.replace(tmp, path)  # an interruption never leaves a half-written file


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# Every collective of an evaluation waits for the slowest rank's share of the attack work: on ViT-H/g in
# fp32 that is hours more than the others' (a few robust points more get APGD-T, FAB-T and Square), far
# past NCCL's 10 minutes or any process-group timeout, whose watchdog would abort the run. So the ranks
# meet only on a gloo group of their own whose timeout is this long, created at the start while all
# ranks are there; the default group's timeout (--dist_timeout_s) then only covers the start.
PATIENT_TIMEOUT = datetime.timedelta(days=30)
_patient = {}


def _patient_group():
    """The gloo group for the ranks' meetings (None in a single process); all ranks must first ask
    for it at the same point, before any attack work."""
    if _rank_world()[1] == 1:
        return None
    if _patient.get('world') is not dist.group.WORLD:  # a new default group (another run in this process)
        _patient.update(world=dist.group.WORLD, group=dist.new_group(backend='gloo', timeout=PATIENT_TIMEOUT))
    return _patient['group']


def _from_rank0(make):
    """make() run on rank 0 only, its result sent to every rank."""
    rank, world = _rank_world()
    if world == 1:
        return make()
    box = [make() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_patient_group())
    return box[0]


def halve_on_oom(work, bs, device, halved):
    """work(bs) at batch size bs; an out-of-memory error halves bs and runs work(bs) again on the same
    points, down to 1. halved(old, new) is told each time. Returns (work's result, the batch size used)."""
    while True:
        try:
            return work(bs), bs
        except torch.OutOfMemoryError:
            pass  # handled below, outside the except clause, whose traceback keeps the batch's tensors alive
        if bs == 1:
            raise SystemExit(f"error: out of memory on {device} with one image per batch: free the device of "
                             "other processes, or use one with more memory")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        halved(bs, bs // 2)
        bs //= 2


def evaluate(model, x, y, norm='Linf', eps=4 / 255, version='standard', attacks=None, batch_size=250,
             seed=0, state_path=None, log=print, overrides=None, device=None, gather_adv=True):
    """AutoAttack of `model` (eval mode, [0,1] inputs, returns logits) on images x, labels y.
    Points are processed in batches of batch_size (per attack, the points still robust, in
    order, as the official code does). Under torch.distributed, rank r evaluates the points
    r, r + world, ... alone, from start to end, as the official multi-GPU AdvXL evaluation
    does: its verdicts are exactly those of a single process given x[r::world]. An out-of-memory
    error halves the batch size for the rest of the evaluation and reruns the batch it hit (the
    batches done before keep their verdicts: a run whose first forward pass fails at batch size
    B is a run at B // 2). With state_path (one file per rank), progress is saved after every
    batch of every attack and a rerun resumes exactly where it stopped.
    Returns clean_acc, robust_acc, per_attack {attack: cumulative robust acc} (percent),
    the exact counts, per-point `robust` verdicts, and x_adv (x where no attack succeeded).
    gather_adv=False: under torch.distributed, x_adv holds only this rank's adversarial images
    (no all-gather of every image over the network when nobody looks at them)."""
    cfg = attack_config(version, norm, attacks, overrides)
    rank, world = _rank_world()
    group = _patient_group()  # made now, while every rank is here
    say = log if rank == 0 else (lambda *a, **k: None)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else x.device
    n_all, t0 = len(x), time.time()
    assert x.min() >= 0 and x.max() <= 1, "inputs must be [0,1] images (normalise inside the model)"
    # A fixed shard per rank for the whole run, never re-dealt between attacks: re-dealing the points
    # still robust would make every rank wait, after every attack, for the one whose share ran longest
    # (the batches that meet robust points run all four attacks); here each rank runs at its own pace.
    x_all = x
    x, y = (x[rank::world], y[rank::world]) if world > 1 else (x, y)
    n = len(x)

    # state: what is done, and the adversarial examples found (one small file per batch)
    pixels = x.reshape(-1)[::1009]  # cheap, position-sensitive fingerprints of the data
    sig = dict(norm=norm, eps=float(eps), version=version, cfg=dict(cfg), seed=seed, n=n, rank=rank, world=world,
               labels=int((y.long().cpu() * torch.arange(1, n + 1)).sum()),
               images=float((pixels.double() * torch.arange(1, len(pixels) + 1, device=x.device)).sum()))
    if state_path is not None and world > 1:
        state_path = f'{state_path}.rank{rank}'
    if state_path is not None and os.path.exists(state_path):
        st = torch.load(state_path, weights_only=True)
        if st['sig'] != sig:
            raise ValueError(f"state file {state_path} belongs to another evaluation "
                             f"({st['sig']}); delete it or pass another --state_path")
        say(f"resuming from {state_path}: {st['attack_i']} attack(s) done, {st['batches']} batch(es) of the "
            f"next, batch size {st['bs']}")
    else:  # pos: how many of the current attack's points are done (its batches run in order)
        st = dict(sig=sig, logits=None, robust=None, attack_i=0, start=None, pos=0, batches=0, counts={},
                  adv_files=[], bs=batch_size)
    found = [torch.load(f, weights_only=True) for f in st['adv_files']]  # [{idx, adv}]

    def save():
        if state_path is not None:
            _save_atomic(st, state_path)

    def halved(old, new):  # sticky: the rest of the run, and a resumed one, keep the smaller size
        st['bs'] = new
        save()
        (log if rank == 0 else print)(f"{f'rank {rank}: ' if world > 1 else ''}out of memory at batch size "
                                      f"{old}: {new} from here on (--bs {new} starts there)")

    def batch_of(work):
        out, st['bs'] = halve_on_oom(work, st['bs'], device, halved)
        return out

    def keep_adv(idx, adv, tag):
        found.append(dict(idx=idx.cpu(), adv=adv.cpu()))
        if state_path is not None:
            os.makedirs(state_path + '.adv', exist_ok=True)
            f = os.path.join(state_path + '.adv', tag + '.pt')
            _save_atomic(found[-1], f)
            st['adv_files'].append(f)

    def checked(bs):
        c = dict(cfg)  # check_model adapts the attack list to the classes; a failed try leaves cfg as it was
        return check_model(model, x[:bs].to(device), y[:bs].to(device), c, version, say) + (c,)
    warnings, n_cls, cfg = batch_of(checked) if n else ([], 1, cfg)  # (more ranks than points: none here)

    def warn(msg):
        warnings.append(msg)
        say('WARNING: ' + msg)
    say(f"AutoAttack {version} ({', '.join(cfg['attacks'])}), {norm} eps {eps:.5g}, {n_all} points"
        f"{f' ({n} on each of {world} ranks)' if world > 1 else ''}, seed {seed}")
    shard = ' on this rank' if world > 1 else ''

    if st['robust'] is None:  # clean pass; the logits are kept for APGD-T / FAB-T's targets
        logits, pos = torch.zeros(n, n_cls), 0
        while pos < n:
            with torch.no_grad():
                out = batch_of(lambda bs: model(x[pos:pos + bs].to(device)).float().cpu())
            logits[pos:pos + len(out)], pos = out, pos + len(out)
        st['logits'], st['robust'] = logits, logits.max(1)[1] == y.cpu()
        st['counts']['clean'] = int(st['robust'].sum())
        save()
    robust, logits = st['robust'], st['logits']
    say(f"clean: {100 * st['counts']['clean'] / max(n, 1):.2f}% ({st['counts']['clean']}/{n}){shard}")

    def attack_batch(name, idx, bs):
        b = idx[st['pos']:st['pos'] + bs]
        xb, yb = x[b].to(device), y[b].to(device)
        torch.manual_seed(seed)  # as official: the same seed for every attack and batch
        fooled, adv = run_attack(name, model, xb, yb, logits[b].to(device), cfg, norm, eps, bs, warn=warn)
        if fooled.any():  # confirm with a fresh forward pass, as the official code does
            with torch.no_grad():
                fooled[fooled.clone()] = model(adv[fooled]).max(1)[1] != yb[fooled]
        return b, fooled.cpu(), adv[fooled]

    elapsed = OrderedDict()  # seconds since the start of this call, after each attack it ran
    for ai, name in enumerate(cfg['attacks']):
        if ai < st['attack_i']:
            continue
        if st['start'] is None:
            st['start'], st['pos'], st['batches'] = robust.clone(), 0, 0
        idx = st['start'].nonzero()[:, 0]
        ta = time.time()
        while st['pos'] < len(idx):
            b, fooled, adv = batch_of(lambda bs: attack_batch(name, idx, bs))
            robust[b[fooled]] = False
            if fooled.any():
                keep_adv(b[fooled], adv, f"{ai}-{st['pos']}")
            st['pos'], st['batches'] = st['pos'] + len(b), st['batches'] + 1
            save()
            say(f"{name}: batch {st['batches']}/{st['batches'] + math.ceil((len(idx) - st['pos']) / st['bs'])}, "
                f"{int(fooled.sum())}/{len(b)} fooled, {int(robust[idx].sum())} of this attack's {len(idx)} points "
                f"left{shard}, {time.time() - ta:.1f} s")
        st['counts'][name], st['attack_i'], st['start'] = int(robust.sum()), ai + 1, None
        elapsed[name] = time.time() - t0
        save()
        say(f"robust accuracy after {name.upper()}: {100 * st['counts'][name] / max(n, 1):.2f}% "
            f"({st['counts'][name]}/{n}){shard}, {time.time() - ta:.1f} s (total {time.time() - t0:.1f} s)")

    counts, robust_all, batch_sizes = dict(st['counts']), robust.clone(), [st['bs']]
    if world > 1:  # the ranks' one meeting: each waits here, patiently, for the others' last attack
        every = [None] * world
        dist.all_gather_object(every, dict(counts=counts, robust=robust, bs=st['bs'], warnings=warnings,
                                           found=found if gather_adv else []), group=group)
        counts = {k: sum(e['counts'][k] for e in every) for k in counts}
        robust_all = torch.zeros(n_all, dtype=torch.bool)
        for r, e in enumerate(every):
            robust_all[r::world] = e['robust']
        batch_sizes = [e['bs'] for e in every]
        warnings += [w for e in every for w in e['warnings'] if w not in warnings]
        found = [dict(f, idx=f['idx'] * world + r) for r, e in enumerate(every) for f in e['found']] \
            if gather_adv else [dict(f, idx=f['idx'] * world + rank) for f in found]
    per_attack = OrderedDict((a, 100 * counts[a] / n_all) for a in cfg['attacks'])
    others = [v for k, v in per_attack.items() if k != 'square']
    if 'square' in per_attack and others and per_attack['square'] < min(others) - 0.2:
        # official check_square_sr: a black-box attack beating the gradient attacks
        warn("Square lowered the robust accuracy beyond the gradient attacks (gradient masking?): "
             "consider more Square queries/restarts or an adaptive attack")
    x_adv = x_all.clone()
    for f in found:
        x_adv[f['idx'].to(x_adv.device)] = f['adv'].to(x_adv.device, x_adv.dtype)
    n_robust = int(robust_all.sum())
    res = dict(clean_acc=100 * counts['clean'] / n_all, robust_acc=100 * n_robust / n_all,
               per_attack=per_attack, x_adv=x_adv, n=n_all, n_clean=counts['clean'], n_robust=n_robust,
               counts=counts, robust=robust_all, norm=norm, eps=float(eps), version=version,
               attacks=cfg['attacks'], seed=seed, warnings=warnings, time_s=time.time() - t0, elapsed_s=elapsed,
               batch_sizes=batch_sizes)
    say(f"robust accuracy: {res['robust_acc']:.2f}% ({n_robust}/{n_all})" +
        (f"  [{len(warnings)} WARNING(S) above: read them before using this number]" if warnings else ''))
    return res


# ----------------------------------------------------------------------------- model, data, batch
def load_model(path, arch=None, classnames=None, device='cpu'):
    """An eval-mode, frozen model on `device` taking [0,1] images: this project's checkpoint (a
    file or a run's out_dir) or a timm / official AdvXL state dict (arch names the preset when
    the file does not say). A tower trained on web data, or with TeCoA / FARE, becomes its
    zero-shot classifier: the one that run evaluated with, stored in its checkpoint, or for an
    older checkpoint rebuilt as train.py built it. An open_clip model spec ('ViT-B-32/openai',
    'ViT-L-14-quickgelu:/path/weights.bin', see open_clip_interop.parse_open_clip_spec) becomes its own
    zero-shot classifier with CLIP's 80 templates over `classnames` (default: ImageNet's), CLIP's
    mean/std inside. A text tower runs on `device`, on rank 0 only (the others get its classifier).
    'local-dir:DIR': a folder export.py wrote, loaded by timm or open_clip (export.load_exported)."""
    from checkpoint import read_checkpoint
    if path.startswith('local-dir:'):  # a folder export.py wrote, loaded by timm or open_clip
        import export
        return export.load_exported(path, classnames, device)
    if open_clip_interop.is_open_clip_spec(path):
        vit, tower = open_clip_interop.load_open_clip(path, text=_rank_world()[0] == 0, device=device)
        m = clip_head.ZeroShotClassifier(vit, _from_rank0(
            lambda: clip_head.zeroshot_weights(tower, classnames).float().cpu()))
        m.config = vit.config
        return m.to(device).eval().requires_grad_(False)
    m = model_lib.model_from_file(path, arch)
    ckpt = read_checkpoint(path)
    cfg = ckpt.get('config') or {}
    if clip_head.is_clip_run(cfg):
        weights = ckpt.get('zeroshot_weights')
        if weights is None:  # written before checkpoints held it
            weights = _from_rank0(lambda: training_zeroshot_weights(cfg, device))
        m = clip_head.ZeroShotClassifier(m, weights)
        m.config = m.image_model.config
    return m.to(device).eval().requires_grad_(False)


def training_zeroshot_weights(cfg, device='cpu'):
    """The zero-shot classifier (fp32, CPU) train.py builds for a run's config: the same text tower
    with the same seed (a random tower) and precision, class names and prompts; encoded on `device`."""
    tower = open_clip_interop.load_text_tower(cfg['text_tower'], cfg['text_pretrained'] or None, device,
                                              precision='bf16' if cfg.get('dtype') == 'bfloat16' else 'fp32',
                                              seed=cfg.get('text_seed', cfg['seed']))
    val = cfg['val_data'] or f'{demo_data.DEMO_ROOT}/val'  # data='demo' leaves it empty
    classes = clip_head.imagenet_classnames() if cfg['num_classes'] == 1000 else data.class_names(val)
    return clip_head.zeroshot_weights(tower, classes, list(cfg['prompt_templates']) or None).float().cpu()


def model_args_of(path, arch=None):
    """The image model's architecture (its config as a dict) read off the file or the open_clip
    config, without building the model: for the memory plan and --dry_run."""
    from dataclasses import asdict
    from checkpoint import read_checkpoint
    if path.startswith('local-dir:'):
        import export
        return export.exported_model_args(path)
    if open_clip_interop.is_open_clip_spec(path):
        return asdict(open_clip_interop.open_clip_tower_config(path))
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and 'model_args' in ckpt:
        return dict(ckpt['model_args'])
    return asdict(model_lib.config_from_timm_state_dict(ckpt, arch))


def model_args_desc(model_args, img_size):
    with torch.device('meta'):  # no weights: only the description
        return model_lib.build_model(dict(model_args, img_size=img_size)).describe()


def parse_eps(s):
    num, _, den = str(s).partition('/')
    return float(num) / float(den) if den else float(num)


def load_demo_val(img_size, n_ex, decode=True):
    """The embedded demo's val split (32x32 PNGs), at the model's resolution; a fixed seeded
    subset when n_ex is smaller (the folders are class-sorted), as data.val_loader picks it.
    decode=False: the labels and description only (x is None; y too before the demo exists:
    a dry run makes no data)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    if not decode and not os.path.isfile(os.path.join(demo_data.DEMO_ROOT, 'DONE')):
        return None, None, f"demo val (the first {n_ex} of a seeded order; made on first use)"
    tf = [T.ToTensor()] if img_size == 32 else [T.Resize(img_size, antialias=True), T.ToTensor()]
    ds = ImageFolder(os.path.join(demo_data.ensure_demo(), 'val'), T.Compose(tf))
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n_ex].sort().values
    ys = torch.tensor([ds.targets[int(i)] for i in keep])
    xs = torch.stack([ds[int(i)][0] for i in keep]) if decode else None
    return xs, ys, f"demo val ({len(keep)} of {len(ds)})"


def load_imagenet_val(root, img_size, n_ex, crop_pct, interpolation, decode=True):
    """ImageNet val: RobustBench's fixed 5000-image list (same order; labels = index of the
    sorted wnid) for n_ex <= 5000, else the whole val set sorted by path. decode=False: the
    files are checked, not read (x is None)."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    val = os.path.join(root, 'val') if os.path.isdir(os.path.join(root, 'val')) else root
    if not os.path.isdir(val):
        raise SystemExit(f"error: no ImageNet validation folder at {val}: pass --data DIR where DIR/val/<wnid>/"
                         "ILSVRC2012_val_*.JPEG (or DIR/<wnid>/...) exists, or omit --data for the demo set")
    assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
    wnid_to_label = json.load(open(os.path.join(assets, 'imagenet_class_to_id_map.json')))
    if n_ex <= 5000:
        files = open(os.path.join(assets, 'imagenet_test_image_ids.txt')).read().split()[:n_ex]
    else:
        files = sorted(f'{w}/{f}' for w in os.listdir(val) if w in wnid_to_label
                       for f in os.listdir(os.path.join(val, w)))[:n_ex]
    missing = [f for f in files if not os.path.exists(os.path.join(val, f))]
    if missing:
        raise SystemExit(f"error: {len(missing)} of {len(files)} images missing under {val}, e.g. "
                         f"{os.path.join(val, missing[0])}: --data must hold the full ImageNet val set "
                         "in wnid folders (see torchvision's ImageNet or valprep.sh)")
    xs = None
    if decode:
        tf = data.val_transform(img_size, crop_pct, interpolation)
        with ThreadPoolExecutor(8) as pool:
            xs = torch.stack(list(pool.map(lambda f: tf(Image.open(os.path.join(val, f)).convert('RGB')), files)))
    ys = torch.tensor([wnid_to_label[f.split('/')[0]] for f in files])
    return xs, ys, f"ImageNet val {val} ({'RobustBench 5000 list' if n_ex <= 5000 else 'sorted'}, " \
        f"first {len(files)}, resize {int(img_size / crop_pct)} {interpolation} + center crop {img_size})"


# What --bs 0 plans for, beyond the model's activations: fp32 tensors the size of the batch that an
# attack keeps (APGD's per-point state is about ten: x, x_adv and its previous value, best point,
# best adversarial, gradient and best gradient, outputs; its step's temporaries and the L1
# projection's sorts add as many at peak), and the share of the free memory it may fill (the rest
# is for the allocator's fragmentation and the cuBLAS / cuDNN workspaces).
IMAGE_COPIES, FREE_FRACTION = 24, 0.9


def _free_bytes(device):
    return torch.cuda.mem_get_info(device)[0] if device.type == 'cuda' else None


def auto_batch_size(model_args, img_size, device, n_points, bf16=False, fab_outputs=0):
    """--bs 0: the official 250 (at most the points per rank) where the memory plan fits it in
    FREE_FRACTION of the device's free memory, else the largest batch that fits (at least 1).
    fab_outputs: the model's outputs when untargeted FAB runs (it keeps one input gradient per
    output). On the CPU: the official 250. Returns (batch, why)."""
    cap = max(1, min(250, n_points))
    free = _free_bytes(device)
    if free is None:
        return cap, 'the official 250' + (f', capped by the {n_points} points per rank' if cap < 250 else '')
    fixed, per_image = memplan.eval_line(model_args, img_size, 'bfloat16' if bf16 else 'float32',
                                         IMAGE_COPIES + 2 * fab_outputs)
    budget = int(FREE_FRACTION * free)
    b = memplan.fitting_eval_batch((fixed, per_image), budget, cap)
    peak = fixed + per_image * b
    return b, (f"memory plan {peak / 2 ** 30:.1f} GiB of {free / 2 ** 30:.1f} GiB free on {device}" +
               (': does not fit, trying anyway' if peak > budget else ''))


class Bf16(torch.nn.Module):
    """bf16 autocast forward, fp32 logits. Not official AutoAttack: faster, can mask gradients."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


def save_examples(model, x, x_adv, y, path, k=8, class_names=None):
    """A PNG grid, one column per fooled point (at most k): the clean image captioned with its
    true and predicted labels, the adversarial image with its predicted label, and the
    perturbation amplified to full range with its Linf and L2 norms. Returns the same facts."""
    from PIL import Image, ImageDraw, ImageFont
    idx = ((x_adv - x).flatten(1).abs().sum(1) > 0).nonzero()[:k, 0]
    if len(idx) == 0:
        return []
    xc, xa = x[idx], x_adv[idx]
    d = xa - xc
    amp = d / (2 * d.flatten(1).abs().max(1)[0].clamp_min(1e-12).view(-1, 1, 1, 1)) + 0.5
    dev = next(model.parameters()).device
    with torch.no_grad():
        pc, pa = model(xc.to(dev)).argmax(1).tolist(), model(xa.to(dev)).argmax(1).tolist()
    name = lambda c: class_names[c] if class_names and c < len(class_names) else str(c)
    facts = [dict(index=int(i), label=int(y[i]), clean_pred=pc[j], adv_pred=pa[j], **{
        nm: float(_flat_norm(d[j:j + 1], nm)) for nm in ('Linf', 'L2', 'L1')}) for j, i in enumerate(idx)]
    tile = max(x.shape[-1], 112)  # small images upscaled (nearest) so the captions fit under them
    font, line, pad = ImageFont.load_default(), 12, 2
    cell_h = tile + 2 * line + pad
    grid = Image.new('RGB', (len(idx) * (tile + pad), 3 * cell_h), 'white')
    draw = ImageDraw.Draw(grid)
    for j, f in enumerate(facts):
        captions = [(f"true {name(f['label'])}", f"pred {name(f['clean_pred'])}"),
                    (f"pred {name(f['adv_pred'])}", ''),
                    (f"Linf {f['Linf'] * 255:.1f}/255", f"L2 {f['L2']:.2f}")]
        for r, img in enumerate((xc[j], xa[j], amp[j])):
            pil = Image.fromarray(img.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
            x0, y0 = j * (tile + pad), r * cell_h
            grid.paste(pil.resize((tile, tile), Image.NEAREST), (x0, y0))
            for t, text in enumerate(captions[r]):
                colour = 'red' if r == 1 and f['adv_pred'] != f['label'] else 'black'
                draw.text((x0 + 2, y0 + tile + t * line), text[:tile // 6], fill=colour, font=font)
    grid.save(path)
    return facts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', required=True, help="this project's checkpoint or a timm/AdvXL state dict, or an "
                    "open_clip model 'name[/tag][:file]' (e.g. ViT-B-32/openai): its zero-shot classifier; or "
                    "local-dir:DIR, a folder export.py wrote")
    ap.add_argument('--arch', default=None, help='preset name when the file does not say (e.g. vit_huge_patch14)')
    ap.add_argument('--norm', default='Linf', choices=['Linf', 'L2', 'L1'])
    ap.add_argument('--eps', default=None, help='e.g. 4/255 (default: Linf 4/255, L2 2.0, L1 75)')
    ap.add_argument('--data', default=None, help='ImageNet root (with val/ of wnid folders); default: demo val')
    ap.add_argument('--n_ex', type=int, default=5000, help='points (ImageNet: <= 5000 uses the RobustBench list)')
    ap.add_argument('--bs', type=int, default=0, help='batch size per rank (also bounds target-class batching); '
                    '0: the official 250 where the memory plan fits it on the device, else the largest batch that '
                    'fits. An out-of-memory error halves it for the rest of the run')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--version', default='standard', choices=['standard', 'plus', 'rand', 'custom'])
    ap.add_argument('--attacks', default=None, help='comma list, e.g. apgd-ce,square (implies --version custom)')
    ap.add_argument('--state_path', default=None, help='resume file (per-batch progress; one per rank: PATH.rankR)')
    ap.add_argument('--save_examples', action='store_true', help='PNG grid of clean / adversarial / perturbation')
    ap.add_argument('--pgd20', action='store_true', help='the PGD-20 metric instead of AutoAttack')
    ap.add_argument('--pgd_step', default=None, help='PGD step (default 1/255 for Linf, eps/8 otherwise)')
    ap.add_argument('--compile', action='store_true', help='torch.compile the model (non-standard)')
    ap.add_argument('--bf16', action='store_true', help='bf16 autocast forward (non-standard)')
    ap.add_argument('--img_size', type=int, default=None, help="input resolution (default: the model's)")
    ap.add_argument('--preprocess', default='advxl', choices=['advxl', 'robustbench'],
                    help="ImageNet preprocessing: 'advxl' (default, the official AdvXL evaluation code): resize "
                         "int(img_size/0.9) bicubic, center crop; 'robustbench': Resize(256) + CenterCrop(224) "
                         "(bilinear, crop_pct 0.875 at other sizes)")
    ap.add_argument('--crop_pct', type=float, default=None,
                    help='ImageNet resize = img_size/crop_pct then center crop (overrides --preprocess\'s 0.9 / 0.875)')
    ap.add_argument('--device', default=None, help='default: cuda if available')
    ap.add_argument('--out_dir', default=None, help="folder for the results JSON (default: the checkpoint's; "
                    "out/eval_<spec> for an open_clip model)")
    ap.add_argument('--dist_timeout_s', type=float, default=3600, help="torchrun: the process group's timeout; "
                    "it covers the start only (ranks never wait on each other's attack work under it)")
    ap.add_argument('--dry_run', action='store_true', help='resolve the model, data and batch size, print them '
                    'in one line and stop')
    args = ap.parse_args(argv)
    if args.attacks:
        args.version = 'custom'
    attacks = args.attacks.split(',') if args.attacks else None
    try:
        attack_list = attack_config(args.version, args.norm, attacks)['attacks']
    except ValueError as e:  # e.g. an unknown attack name
        raise SystemExit(f"error: {e}")

    world = int(os.environ.get('WORLD_SIZE', 1))
    local = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device(args.device or (f'cuda:{local}' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized() and not args.dry_run:
        init_distributed(str(device), args.dist_timeout_s)  # as train.py: NCCL on GPUs, every launcher and round
    rank, world = _rank_world() if dist.is_initialized() else (int(os.environ.get('RANK', 0)), world)
    group = _patient_group()  # made now, while every rank is here
    say = print if rank == 0 else (lambda *a, **k: None)

    eps = parse_eps(args.eps) if args.eps is not None else DEFAULT_EPS[args.norm]
    eps_tag = (args.eps or {'Linf': '4/255', 'L2': '2.0', 'L1': '75'}[args.norm]).replace('/', '-')
    open_clip_spec = open_clip_interop.is_open_clip_spec(args.ckpt)
    exported = args.ckpt.startswith('local-dir:')  # export.py's folder: its classes and results as for a spec
    try:
        model_args = model_args_of(args.ckpt, args.arch)
    except ValueError as e:  # an --arch that does not fit the weights
        raise SystemExit(f"error: {e}")
    img_size = args.img_size or model_args['img_size']
    if args.data is None:
        x, y, data_desc = load_demo_val(img_size, args.n_ex, decode=not args.dry_run)
    else:
        official = args.preprocess == 'advxl'
        # an open_clip model's own preprocessing: resize the short side to img_size (bicubic), center crop
        crop_pct = args.crop_pct or (1.0 if open_clip_spec and official else 0.9 if official else 0.875)
        x, y, data_desc = load_imagenet_val(args.data, img_size, args.n_ex, crop_pct,
                                            'bicubic' if official else 'bilinear', decode=not args.dry_run)
        data_desc += f", --preprocess {args.preprocess}"
    if args.bs:
        bs, bs_why = args.bs, '--bs'
    else:
        untargeted_fab = not args.pgd20 and 'fab' in attack_list
        n_classes = len(demo_data.DEMO_CLASSES) if y is None else int(y.max()) + 1
        outputs = n_classes if model_args.get('embed_out') else model_args['num_classes']
        n_points = args.n_ex if y is None else len(y)
        bs, bs_why = auto_batch_size(model_args, img_size, device, math.ceil(n_points / world), args.bf16,
                                     outputs if untargeted_fab else 0)
        if group is not None:  # one batch size for every rank: the run is described by one number
            t = torch.tensor([bs])
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
            bs = int(t)
    what = "PGD-20" if args.pgd20 else f"AutoAttack {args.version}" + (f" ({args.attacks})" if args.attacks else '')
    if args.dry_run:
        line = (f"dry run: model {args.ckpt} ({model_args_desc(model_args, img_size)}), data: {data_desc}, {what}, "
                f"{args.norm} eps {eps:.5g}, batch {bs} per rank ({bs_why}), {world} rank(s), device {device}")
        say(line)
        return dict(dry_run=True, batch_size=bs, batch_size_from=bs_why, data=data_desc, img_size=img_size,
                    model_args=model_args, summary=line)
    demo_classes = data.class_names(os.path.join(demo_data.DEMO_ROOT, 'val')) \
        if (open_clip_spec or exported) and args.data is None else None
    model = load_model(args.ckpt, args.arch, classnames=demo_classes, device=device)
    say(f"model {args.ckpt} ({getattr(model, 'config', '')}), data: {data_desc}, device {device}, {world} rank(s), "
        f"batch {bs} per rank ({bs_why})")
    nonstandard = []
    if args.compile:
        model = torch.compile(model)
        nonstandard.append('torch.compile')
    if args.bf16:
        model = Bf16(model)
        nonstandard.append('bf16 autocast')
    if nonstandard:
        say(f"NON-STANDARD run ({', '.join(nonstandard)}): not the official AutoAttack setting; "
            "report these numbers as such")
    out_dir = args.ckpt if os.path.isdir(args.ckpt) else (os.path.dirname(args.ckpt) or '.')
    if open_clip_spec or exported:  # results of an open_clip model or an export go to out/eval_<spec>/
        out_dir = os.path.join('out', 'eval_' + ''.join(c if c.isalnum() or c in '-.' else '_' for c in args.ckpt))
    out_dir = args.out_dir or out_dir
    os.makedirs(out_dir, exist_ok=True)
    info = dict(ckpt=args.ckpt, arch=args.arch, data=data_desc, img_size=img_size, norm=args.norm, eps=eps,
                eps_str=args.eps, seed=args.seed, nonstandard=nonstandard, torch=torch.__version__,
                device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu', world=world,
                batch_size=bs, batch_size_from=bs_why, precision='bf16 autocast' if args.bf16 else 'fp32 (TF32 off)')

    # fp32 without TF32, as the official evaluation (cuDNN's default would run the patch embedding in TF32)
    with nullcontext() if args.bf16 else attack.TrueFp32():
        if args.pgd20:
            if args.norm == 'L1':
                raise SystemExit("error: --pgd20 supports Linf and L2 (attack.pgd)")
            step = parse_eps(args.pgd_step) if args.pgd_step else (1 / 255 if args.norm == 'Linf' else eps / 8)
            xs, ys = x[rank::world], y[rank::world]  # this rank's points alone, as for AutoAttack (see evaluate)

            def pgd20(b):  # the whole shard again after an out-of-memory error: the same run as one at b
                torch.manual_seed(args.seed)
                return attack.evaluate_pgd(model, zip(xs.split(b), ys.split(b)), eps, 20, step, args.norm, group=group)
            t0 = time.time()
            (clean_acc, robust_acc, total), bs = halve_on_oom(pgd20, bs, device, lambda old, new: print(
                f"{f'rank {rank}: ' if world > 1 else ''}out of memory at batch size {old}: {new} from here on"))
            n_clean, n_robust = round(clean_acc * total / 100), round(robust_acc * total / 100)
            res = dict(info, attack=f'PGD-20 step {step:.5g}', n=total, n_clean=n_clean, n_robust=n_robust,
                       clean_acc=clean_acc, robust_acc=robust_acc, time_s=time.time() - t0)
            out = os.path.join(out_dir, f'pgd20_{args.norm}_{eps_tag}.json')
            say(f"clean {res['clean_acc']:.2f}%  PGD-20 ({args.norm}, eps {eps:.5g}, step {step:.5g}) "
                f"{res['robust_acc']:.2f}%")
        else:
            r = evaluate(model, x, y, norm=args.norm, eps=eps, version=args.version, attacks=attacks,
                         batch_size=bs, seed=args.seed, state_path=args.state_path, log=say, device=device,
                         gather_adv=bool(args.save_examples))
            res = dict(info, **{k: v for k, v in r.items() if k not in ('x_adv', 'robust')})
            say(f"\n{'attack':<10} {'robust acc':>10}\n{'clean':<10} {r['clean_acc']:>9.2f}%")
            for a, acc in r['per_attack'].items():
                say(f"{a:<10} {acc:>9.2f}%")
            out = os.path.join(out_dir, f'autoattack_{args.norm}_{eps_tag}.json')
            if args.save_examples and rank == 0:
                names = data.class_names(os.path.join(demo_data.DEMO_ROOT, 'val')) if args.data is None else \
                    clip_head.imagenet_classnames()  # (ImageNet's labels: sorted wnids, the list's order)
                png = out[:-5] + '_examples.png'
                res['examples'] = save_examples(model, x, r['x_adv'], y, png, class_names=names)
                res['examples_png'] = png
                say(f"examples: {png} (rows: clean, adversarial, amplified perturbation)")
    if rank == 0:
        with open(out, 'w') as f:
            json.dump(res, f, indent=1)
        say(f"wrote {out}")
    if world > 1:
        _patient.clear()  # nothing may hold a process group at exit (distributed.leave_distributed)
        leave_distributed()
    return res


if __name__ == '__main__':
    main()
