"""
AdvXL adversarial training, one stage per run. The defaults below ARE the embedded demo's
first stage (16 px, PGD-1 on CPU); a config file overrides them for another stage:

$ python train.py                                      # demo pre-training
$ python train.py config/demo_ft.py                    # demo fine-tuning (init_from the first)
$ torchrun --nproc_per_node=8 train.py config/advxl_vitl_laion.py
$ torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/advxl_vitl_laion

Each step: PGD finds adversarial images with input-only gradients on the unwrapped model
(no weight gradients, no all-reduce), then the model trains on the adversarial images only.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data as datalib
from attack import evaluate_pgd, pgd
from clip_head import (ContrastiveLoss, ZeroShotClassifier, attack_loss_fn, head_from_zeroshot, imagenet_classnames,
                       load_text_tower, zeroshot_weights)
from model import build_model, clean_state_dict, config_from_timm_state_dict, create_model, is_convnext

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/demo_pre'
init_from = 'scratch'      # 'scratch' | 'resume' (this out_dir) | path to another run's out_dir or ckpt (new stage)
log_every = 8192           # samples between log lines (also when SIGTERM and NaN are checked)
eval_every = 16000         # samples between evaluations on the fixed val subset (plot.py's curves); 0 = only at the end
eval_samples = 256         # size of that fixed subset
final_eval_samples = 200   # images for the final table; 0 = the whole val set
ckpt_every = 0             # samples between checkpoints; 0 = only at the end (and on SIGTERM)
wandb_log = False
wandb_project = 'nanoadvxl'
# data
data = 'demo'              # 'demo' | 'imagefolder' | 'webdataset'
train_data = ''            # ImageFolder train root, or a shard pattern for webdataset
val_data = ''              # ImageFolder val root (labelled)
num_workers = 1            # DataLoader workers per rank (the demo decodes ~1000 img/s on one)
crop_scale = (1.0, 1.0)    # RandomResizedCrop scale range; (1, 1) = resize the whole image
hflip = True
randaug_n = 0              # RandAugment ops (0 = off)
randaug_m = 9              # RandAugment magnitude
mixup = 0.0                # MixUp alpha (0 = off)
cutmix = 0.0               # CutMix alpha (0 = off)
label_smoothing = 0.1
val_crop_pct = 1.0         # val: resize to img_size/val_crop_pct, then center crop
max_bad_frac = 0.01        # abort when more than this fraction of images is unreadable
# web-scale image-text data (data='webdataset'): captions embedded by a frozen CLIP text tower
text_tower = 'ViT-L-14-CLIPA'   # open_clip model name whose text side is used
text_pretrained = 'datacomp1b'  # open_clip pretrained tag, or a local weights file
logit_scale_init = 1 / 0.07     # learnable temperature of the contrastive loss (CLIP)
caption_embeddings = ''         # optional side file of precomputed caption embeddings (clip_head.py)
prompt_templates = ()           # zero-shot prompts with '{}' for the class name; () = CLIP's 80
shuffle_buffer = 1000           # samples per worker in the webdataset shuffle buffer
# model
model = 'vit_demo_patch4'  # preset in model.PRESETS
img_size = 16              # this stage's resolution (the paper's token reduction by resizing)
num_classes = 10
drop_path_rate = 0.0
global_pool = 'avg'
grad_ckpt = False          # activation checkpointing, for ViT-H/g memory
mask_ratio = 0.0           # token reduction by masking (Table 1a)
mask_kind = 'random'       # 'random' | 'block'
# attack (training)
norm = 'Linf'
eps = 8 / 255
pgd_steps = 1
pgd_step_size = 8 / 255
pgd_random_start = True
eps_warmup = 16000         # samples over which eps (and the step size) ramp up linearly from 0
# attack (evaluation): PGD-20, step 1/255, at the training eps unless set
eval_eps = 0.0             # 0 = same as eps
eval_pgd_steps = 20
eval_step_size = 1 / 255
# optimisation
samples = 64000            # this stage's budget, in samples seen
batch_size = 64            # global batch per optimizer step (all ranks, all micro-steps)
micro_batch_size = 0       # per rank per forward; 0 = batch_size / world size (no accumulation)
lr = 1.5e-3
min_lr = 1e-5
warmup_samples = 3000
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
ema_decay = 0.0            # 0 = no EMA; otherwise evaluate and hand on the EMA weights
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile = False
cpu_threads = 0            # torch threads per rank on CPU; 0 = cores / ranks - workers (oversubscribed cores crawl)
seed = 0
peak_flops = 989e12        # dense bf16 peak of one GPU, for MFU (H100 SXM)
dry_run = False            # print this stage's plan and compute, touch nothing
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _config_keys(globals())}  # noqa: F821 (defined by configurator)
# -----------------------------------------------------------------------------


def ckpt_path(path):
    return os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path


def load_checkpoint(path):
    path = ckpt_path(path)
    if not os.path.isfile(path):
        raise SystemExit(f"init_from: no checkpoint at {path} (give a run's out_dir or a .pt file; "
                         f"'resume' continues {out_dir})")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f"init_from: cannot read {path} ({type(e).__name__}); is it a torch checkpoint?")


def stage_model_config(src_ckpt):
    """This stage's architecture: the preset, or the init_from checkpoint's architecture with
    this stage's resolution, class count and regularisation."""
    stage = dict(img_size=img_size, num_classes=num_classes, drop_path_rate=drop_path_rate, grad_ckpt=grad_ckpt)
    if src_ckpt is None:
        vit_only = {} if is_convnext(model) else dict(global_pool=global_pool)
        return asdict(create_model_meta(model, **vit_only, **stage).config)
    if 'model_args' in src_ckpt:
        args = dict(src_ckpt['model_args'])
    else:  # a timm / official AdvXL state dict: the preset named by `model` must fit it
        args = asdict(config_from_timm_state_dict(src_ckpt, arch=model))
    keep_embed = src_ckpt.get('config', {}).get('data') == 'webdataset' and data == 'webdataset'
    return {**args, **stage, 'embed_out': args.get('embed_out', 0) if keep_embed else 0}


def create_model_meta(name, **kw):
    try:
        with torch.device('meta'):
            return create_model(name, **kw)
    except ValueError as e:
        raise SystemExit(f"model: {e}")


def eps_str(v):
    return f"{v * 255:.3g}/255" if norm == 'Linf' else f"{v:.3g}"  # L_inf radii read best in pixel levels


def stage_compute(cfg):
    """Forward MACs x (PGD steps + 1) x samples, in 1e10 GFLOPs (the paper's Table 2 column)."""
    with torch.device('meta'):
        m = build_model(cfg)
    per_sample = m.flops(img_size, mask_ratio, mask_kind) * (pgd_steps + 1)
    return per_sample, per_sample * samples / 1e19


# ----------------------------------------------------------------------------- dry run
src = None
if init_from == 'resume':
    if not dry_run or os.path.exists(ckpt_path(out_dir)):
        src = load_checkpoint(out_dir)
elif init_from != 'scratch' and (not dry_run or os.path.exists(ckpt_path(init_from))):
    src = load_checkpoint(init_from)
model_args = dict(src['model_args']) if init_from == 'resume' and src else stage_model_config(src)
try:
    fwd_macs, compute_1e10 = stage_compute(model_args)
except ValueError as e:  # e.g. mask_ratio on a ConvNeXt: the model says why
    raise SystemExit(f"mask_ratio={mask_ratio}: {e}")

if dry_run:
    with torch.device('meta'):
        arch = build_model(model_args).describe()
    print(f"stage {os.path.basename(out_dir)}: {arch}, {samples / 1e6:g}M samples at {img_size}px "
          f"(mask {mask_ratio:g} {mask_kind}), "
          f"PGD-{pgd_steps} {norm} eps {eps_str(eps)} step {eps_str(pgd_step_size)}, "
          f"{fwd_macs / (pgd_steps + 1) / 1e9:.2f} GMACs forward/sample, batch {batch_size}, "
          f"{math.ceil(samples / batch_size)} steps")
    print(f"compute_1e10_gflops={compute_1e10:.6g}")
    sys.exit(0)

# ----------------------------------------------------------------------------- setup
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith('cuda'):
        device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
        torch.cuda.set_device(device)
else:
    rank, world = 0, 1
master = rank == 0
log = print if master else (lambda *a, **k: None)
micro = micro_batch_size or batch_size // world
grad_accum = batch_size // (micro * world)
if grad_accum * micro * world != batch_size:
    raise SystemExit(f"batch_size {batch_size} is not a multiple of micro_batch_size {micro} x {world} ranks")
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device_type == 'cpu':
    torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // world - num_workers))
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
if master:
    os.makedirs(out_dir, exist_ok=True)

# data: the demo (anything under data_cache/demo) is generated once by rank 0, the others wait
if data not in ('demo', 'imagefolder', 'webdataset'):
    raise SystemExit(f"data='{data}' is unknown: use 'demo', 'imagefolder' or 'webdataset'")
if data == 'demo':
    train_data, val_data = train_data or f'{datalib.DEMO_ROOT}/train', val_data or f'{datalib.DEMO_ROOT}/val'
if any(p.startswith(datalib.DEMO_ROOT) for p in (train_data, val_data)):
    if master:
        datalib.ensure_demo()
    if ddp:
        dist.barrier()
web = data == 'webdataset'
val_tf = datalib.val_transform(img_size, val_crop_pct)

# the frozen text tower: for web data, and to give a web-trained tower its zero-shot head
src_cfg = (src or {}).get('config', {})
tower = None
if web or (src is not None and src_cfg.get('data') == 'webdataset'):
    tower_cfg = config if web else src_cfg  # a labelled stage rebuilds the web run's own tower and prompts
    tower = load_text_tower(tower_cfg['text_tower'], tower_cfg['text_pretrained'] or None, device,
                            precision='bf16' if dtype == 'bfloat16' else 'fp32', seed=tower_cfg['seed'])
    classnames = imagenet_classnames() if num_classes == 1000 else datalib.class_names(val_data)
    zs_weights = zeroshot_weights(tower, classnames, list(tower_cfg['prompt_templates']) or None).to(device)
if web:
    model_args['embed_out'] = tower.embed_dim



@torch.no_grad()
def zeroshot_feature_norm(backbone, proj):
    """Mean |image embedding| over a few val images: scales the zero-shot head's logits."""
    ds = datalib.ImageFolderSafe(val_data, val_tf)
    x = torch.stack([item[0] for item in (ds[(i, 0)] for i in range(min(32, len(ds)))) if item is not None])
    z = proj(backbone.eval().forward_features(x))
    backbone.train()
    return z.norm(dim=-1).mean().item()


# model, optimizer, state
torch.manual_seed(seed)
raw_model = build_model(model_args)
samples_seen, compute_prev, samples_prev = 0, 0.0, 0  # *_prev: earlier stages, for the logs' totals
if src is not None:
    if init_from == 'resume':  # the trained weights (the EMA, if any, is restored below)
        raw_model.load_timm_state_dict(src['model'])
        samples_seen = src['samples_seen']
        compute_prev, samples_prev = src['compute_prev'], src.get('samples_prev', 0)
    else:  # a new stage: weights only (pos embed resized; a new head if the task changed)
        sd = clean_state_dict(src.get('ema') or src.get('model', src))  # a new stage takes the EMA weights if kept
        key = raw_model.classifier_key()
        new_head = sd[key + '.weight'].shape != raw_model.get_classifier().weight.shape
        raw_model.load_timm_state_dict(sd, skip_head=new_head)
        if new_head and tower is not None and not web:  # web -> labels: start from the zero-shot classifier
            proj = torch.nn.Linear(*sd[key + '.weight'].shape[::-1])
            proj.load_state_dict({'weight': sd[key + '.weight'], 'bias': sd[key + '.bias']})
            raw_model.set_classifier(head_from_zeroshot(torch.nn.ModuleDict({'head': proj}), zs_weights.cpu(),
                                                        feature_norm=zeroshot_feature_norm(raw_model, proj)))
            log("init_from: class head initialised from the CLIP zero-shot classifier")
        compute_prev = src.get('compute_prev', 0.0) + src.get('compute', 0.0)
        samples_prev = src.get('samples_prev', 0) + src.get('samples_seen', 0)
        log(f"init_from {init_from}: {'new head, ' if new_head else ''}{raw_model.describe()}")
raw_model.to(device)
contrastive = ContrastiveLoss(logit_scale_init).to(device) if web else None
decay = [p for n, p in raw_model.named_parameters() if p.ndim >= 2 and 'pos_embed' not in n and 'cls_token' not in n]
no_decay = [p for n, p in raw_model.named_parameters() if not (p.ndim >= 2 and 'pos_embed' not in n and 'cls_token' not in n)]
no_decay += list(contrastive.parameters()) if web else []  # the temperature
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                               {'params': no_decay, 'weight_decay': 0.0}], lr=lr, betas=(beta1, beta2),
                              fused=device_type == 'cuda')
ema = None
if ema_decay > 0:
    ema = build_model(model_args).to(device).requires_grad_(False)
    ema.load_state_dict(src['ema'] if init_from == 'resume' and src.get('ema') else raw_model.state_dict())
if init_from == 'resume':
    optimizer.load_state_dict(src['optimizer'])
    if web:
        contrastive.load_state_dict(src['contrastive'])
    log(f"resumed {out_dir} at {samples_seen} samples")
data_state = src.get('data_state') if init_from == 'resume' else None
src = None  # free the checkpoint's memory

fast_model = torch.compile(raw_model) if compile else raw_model  # attacks and training use this one
train_model = DDP(fast_model, device_ids=[device] if device_type == 'cuda' else None) if ddp else fast_model

if web:
    train_loader = datalib.web_loader(train_data, img_size, micro, rank, world, seed, num_workers, state=data_state,
                                      shuffle_buffer=shuffle_buffer, scale=tuple(crop_scale), hflip=0.5 * hflip,
                                      pin_memory=device_type == 'cuda')
    captions = None
    if caption_embeddings:
        from clip_head import CaptionEmbeddings
        captions = CaptionEmbeddings(caption_embeddings)
else:
    train_tf = datalib.train_transform(img_size, tuple(crop_scale), hflip, randaug_n, randaug_m)
    train_loader = datalib.image_folder_loader(train_data, train_tf, micro, rank, world, seed,
                                               start=samples_seen // world, num_workers=num_workers)
val_loader = datalib.val_loader(val_data, val_tf, micro, eval_samples, rank, world, num_workers)
final_loader = datalib.val_loader(val_data, val_tf, micro, final_eval_samples or None, rank, world, num_workers)
train_iter = iter(train_loader)


def loss_fn(logits, targets):
    return F.cross_entropy(logits.float(), targets)


train_loss = contrastive if web else loss_fn
attack_loss = attack_loss_fn(contrastive) if web else loss_fn  # Eq. 3: the attack maximises the training loss


def next_batch():
    """(images, targets for the loss, labels for the accuracy, unreadable images skipped)."""
    if web:  # targets: the captions' fixed text embeddings; accuracy: in-batch image->text retrieval
        b = next(train_iter)
        x = b.image.to(device, non_blocking=True)
        txt = captions[b.key].to(device) if captions is not None else tower.encode(b.text).to(device)
        return x, txt, torch.arange(len(x), device=device), sum(train_loader.skipped_last.values())
    x, y, n_bad = next(train_iter)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    targets = datalib.soft_targets(y, num_classes, label_smoothing)
    x, targets = datalib.mix_batch(x, targets, mixup, cutmix)
    return x, targets, y, n_bad


def predictions(out, targets):
    return (F.normalize(out.float(), dim=-1) @ targets.T).argmax(1) if web else out.argmax(1)


def lr_at(s):
    if s < warmup_samples:
        return lr * (s + batch_size) / warmup_samples
    progress = min(1.0, (s - warmup_samples) / max(1, samples - warmup_samples))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def save_checkpoint():
    states = None
    if web:  # every rank's stream position, so each can resume exactly
        states = [None] * world
        dist.all_gather_object(states, train_loader.state_dict()) if ddp else states.__setitem__(0, train_loader.state_dict())
        states = datalib.merge_states(states)
    if not master:
        return
    if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
        raise SystemExit(f"weights are NaN/inf at {samples_seen} samples: not overwriting the last good checkpoint "
                         f"in {out_dir} (lower lr or check the data)")
    ckpt = {'model': raw_model.state_dict(), 'model_args': model_args, 'optimizer': optimizer.state_dict(),
            'ema': ema.state_dict() if ema is not None else None, 'samples_seen': samples_seen,
            'compute': fwd_macs * samples_seen / 1e19, 'compute_prev': compute_prev, 'samples_prev': samples_prev,
            'stage': os.path.basename(out_dir), 'config': config, 'data_state': states,
            'contrastive': contrastive.state_dict() if web else None}
    tmp = os.path.join(out_dir, 'ckpt.pt.tmp')
    torch.save(ckpt, tmp)
    os.replace(tmp, os.path.join(out_dir, 'ckpt.pt'))  # atomic: a crash keeps the last good one


def progress():
    """Where the run stands, for every log record: this stage's samples, and samples and compute
    summed over the stages so far (plot.py's axes)."""
    return {'stage': stage, 'samples': samples_seen, 'samples_total': samples_prev + samples_seen,
            'compute_1e10': compute_prev + fwd_macs * samples_seen / 1e19}


def write_log(record):
    if master:
        with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')
        if wandb_log:
            wandb.log(record)


got_sigterm = False


def on_sigterm(signum, frame):
    global got_sigterm
    got_sigterm = True  # acted on after this step (one process) or at the next log point (DDP: all ranks agree)


signal.signal(signal.SIGTERM, on_sigterm)
if wandb_log and master:
    import wandb
    wandb.init(project=wandb_project, name=os.path.basename(out_dir), config=config)

eval_model = ema if ema is not None else raw_model
if web:  # a web-trained tower is evaluated as a zero-shot classifier of the labelled val set
    eval_model = ZeroShotClassifier(eval_model, zs_weights)
stage = os.path.basename(out_dir)
log(f"stage {stage}: {raw_model.describe()}, {samples} samples at {img_size}px, PGD-{pgd_steps}, "
    f"batch {batch_size} = {world} rank(s) x {micro} x {grad_accum} accumulation, {device} {dtype}")

# ----------------------------------------------------------------------------- training loop
step = samples_seen // batch_size
t_start = t_last = time.time()
last_log_samples = samples_seen
acc_loss = torch.zeros((), device=device)
acc_correct = torch.zeros((), device=device)
bad_images = torch.zeros((), dtype=torch.long)
first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
while samples_seen < samples:
    torch.manual_seed(seed * 1_000_003 + step * 1009 + rank)  # randomness is a function of (step, rank): exact resume
    ramp = min(1.0, (samples_seen + batch_size) / eps_warmup) if eps_warmup > 0 else 1.0
    eps_now, step_now = eps * ramp, pgd_step_size * ramp
    for group in optimizer.param_groups:
        group['lr'] = lr_at(samples_seen)
    for micro_step in range(grad_accum):
        x, targets, y, n_bad = next_batch()
        bad_images += n_bad
        with autocast:
            x_adv = pgd(fast_model, x, targets, attack_loss, eps_now, step_now, pgd_steps, norm, pgd_random_start,
                        mask_ratio=mask_ratio, mask_kind=mask_kind)
            sync = not ddp or micro_step == grad_accum - 1  # all-reduce gradients once per optimizer step
            with train_model.no_sync() if not sync else nullcontext():
                logits = train_model(x_adv, mask_ratio=mask_ratio, mask_kind=mask_kind)
                loss = train_loss(logits, targets) / grad_accum
                loss.backward()
        acc_loss += loss.detach()
        acc_correct += (predictions(logits.detach(), targets) == y).sum()
    first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(acc_loss), step, first_bad_step)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        with torch.no_grad():  # else autograd chains every step's update onto the last: a growing graph
            torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - ema_decay)
    samples_seen += batch_size
    step += 1

    done = samples_seen >= samples
    # a log point: every log_every samples, at the end, and (one process) right after a SIGTERM
    if samples_seen // log_every > (samples_seen - batch_size) // log_every or done or (got_sigterm and not ddp):
        sums = torch.stack([acc_loss, acc_correct, bad_images.to(device).float()])
        maxes = torch.stack([first_bad_step.float(), torch.tensor(float(got_sigterm), device=device)])
        if ddp:
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        (loss_sum, correct, n_bad), (bad_step, stop) = sums.tolist(), maxes.tolist()
        if bad_step >= 0:
            raise SystemExit(f"loss is NaN/inf at step {int(bad_step)} ({samples_seen} samples); "
                             f"the last good checkpoint in {out_dir} is kept (lower lr or check the data)")
        n = samples_seen - last_log_samples
        dt, t_last = time.time() - t_last, time.time()
        if n_bad > max_bad_frac * samples_seen:
            raise SystemExit(f"{int(n_bad)} unreadable images in {samples_seen} samples exceeds max_bad_frac={max_bad_frac}; "
                             f"check {train_data}")
        record = {**progress(), 'loss': loss_sum / (n / batch_size), 'adv_acc': 100 * correct / n,
                  'lr': lr_at(samples_seen - batch_size), 'eps': eps_now, 'img_per_s': n / dt, 'bad_images': int(n_bad)}
        mfu = ''
        if device_type == 'cuda':  # FLOPs: train fwd+bwd = 3x forward, each attack step 2x forward
            flops = 2 * fwd_macs / (pgd_steps + 1) * (3 + 2 * pgd_steps) * n / dt
            record['mfu'] = flops / (peak_flops * world)
            mfu = f", MFU {100 * record['mfu']:.1f}%"
        log(f"{stage} {samples_seen}/{samples} | loss {record['loss']:.4f} | adv acc {record['adv_acc']:.1f}% | "
            f"lr {record['lr']:.2e} | eps {eps_str(eps_now)} | {record['img_per_s']:.0f} img/s{mfu} | "
            f"compute {record['compute_1e10'] * 1e10:.3g} GFLOPs")
        write_log(record)
        acc_loss.zero_(), acc_correct.zero_()
        last_log_samples = samples_seen
        if stop:
            save_checkpoint()
            log(f"SIGTERM: checkpoint written at {samples_seen} samples; resume with --init_from=resume")
            if ddp:
                dist.barrier()
                dist.destroy_process_group()
            sys.exit(0)
    if eval_every and (samples_seen // eval_every > (samples_seen - batch_size) // eval_every) and not done:
        clean, robust, _ = evaluate_pgd(eval_model, val_loader, eval_eps or eps, eval_pgd_steps, eval_step_size,
                                        norm, autocast=autocast)
        log(f"eval {samples_seen}: clean {clean:.2f}% | PGD-{eval_pgd_steps} {robust:.2f}%")
        write_log({**progress(), 'clean_acc': clean, 'pgd20_acc': robust})
    if ckpt_every and samples_seen // ckpt_every > (samples_seen - batch_size) // ckpt_every and not done:
        save_checkpoint()

save_checkpoint()
train_s = time.time() - t_start
clean, robust, n_eval = evaluate_pgd(eval_model, final_loader, eval_eps or eps, eval_pgd_steps, eval_step_size,
                                     norm, autocast=autocast)
results = {'clean_acc': clean, 'pgd20_acc': robust, 'eps': eval_eps or eps, 'samples': samples_seen,
           'wall_s': time.time() - t_start, 'train_s': train_s, 'eval_images': n_eval, 'img_size': img_size,
           'model': model, 'compute_1e10': compute_prev + compute_1e10}
write_log({**progress(), 'clean_acc': clean, 'pgd20_acc': robust, 'compute_1e10': results['compute_1e10'], 'final': True})
if master:
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    print(f"\n| stage | samples | eps | clean | PGD-{eval_pgd_steps} | wall |\n|---|---|---|---|---|---|\n"
          f"| {stage} | {samples_seen} | {eps_str(results['eps'])} | {clean:.1f}% | {robust:.1f}% | "
          f"{results['wall_s']:.0f}s |")
if ddp:
    dist.barrier()  # leave together: a rank that tears down gloo while another still talks to it aborts
    dist.destroy_process_group()
