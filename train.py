"""
AdvXL adversarial training, one stage per run. The defaults below ARE the embedded demo's
first stage (16 px, PGD-1 on CPU); a config file overrides them for another stage:

$ python train.py                                      # demo pre-training
$ python train.py config/demo_ft.py                    # demo fine-tuning (init_from the first)
$ torchrun --nproc_per_node=8 train.py config/advxl_vitl_laion.py
$ torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vitl.py --init_from=out/advxl_vitl_laion

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

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data as datalib
from attack import TrueFp32, evaluate_pgd, pgd
from batches import TrainBatches
from checkpoint import refuse_nonfinite, save_checkpoint as write_checkpoint
from clip_head import (ContrastiveLoss, TextEncoder, ZeroShotClassifier, caption_targets, predicted_labels,
                       trained_zeroshot_weights)
from distributed import StopFlag, agree_on_resume, init_distributed, leave_distributed, no_sync, threads_per_rank
from memplan import final_eval_batch
from model import build_model
from stage import (CLIP_LOSSES, batch_layout, check_config, data_paths, eps_str, fare_copy, find_start, make_ema,
                   make_optimizer, prepare_out_dir, print_dry_run, stage_compute, stage_losses, start_weights,
                   text_side, zeroshot_prompts)

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/demo_pre'
init_from = 'scratch'      # 'scratch' | 'resume' (this out_dir) | path to another run's out_dir or ckpt (new stage)
log_every = 8192           # samples between log lines (also when SIGTERM and NaN are checked)
eval_every = 40000         # samples between evaluations on the fixed val subset (plot.py's curves); 0 = only at the end
eval_samples = 256         # size of that fixed subset
final_eval_samples = 200   # images for the final table; 0 = the whole val set
ckpt_every = 0             # samples between checkpoints; 0 = only at the end (and on SIGTERM)
keep_ckpts = 2             # checkpoints kept in out_dir (ckpt-<samples>.pt): a damaged newest one is not the only one
overwrite = False          # True: start this stage afresh in an out_dir that holds another stage's checkpoints
wandb_log = False
wandb_project = 'nanoadvxl'
# data
data = 'demo'              # 'demo' | 'imagefolder' | 'shards' (labelled .jpg + .cls, make_shards.py) | 'webdataset'
train_data = ''            # ImageFolder train root, or a shard pattern for shards / webdataset
val_data = ''              # ImageFolder val root (labelled)
num_workers = 0            # DataLoader workers per rank; 0 = decode in the training process (the demo's small
                           # images cost less there than the core a worker takes from compute: docs/demo.md)
crop_scale = (1.0, 1.0)    # RandomResizedCrop scale range; (1, 1) = resize the whole image
hflip = True
auto_augment = ''          # timm RandAugment string, e.g. MAE's 'rand-m9-mstd0.5-inc1'; '' = off
train_interpolation = 'bilinear'  # the crop's resize (paper Sec. 3.1: anti-aliased bilinear)
reprob = 0.0               # random erasing probability (timm, 'pixel' mode), on the device
mixup = 0.0                # MixUp alpha (0 = off)
cutmix = 0.0               # CutMix alpha (0 = off)
label_smoothing = 0.1
val_crop_pct = 1.0         # val: resize to img_size/val_crop_pct, then center crop
val_interpolation = 'bilinear'  # the ImageNet configs use 'bicubic', as the official evaluation
max_bad_frac = 0.01        # abort when more than this fraction of images is unreadable
# web-scale image-text data (data='webdataset'): captions embedded by a frozen CLIP text tower
text_tower = 'ViT-L-14-CLIPA'   # open_clip model name whose text side is used
text_pretrained = 'datacomp1b'  # open_clip pretrained tag, or a local weights file
logit_scale_init = 1 / 0.07     # learnable temperature of the contrastive loss (CLIP)
caption_embeddings = ''         # optional side file of precomputed caption embeddings (clip_head.py)
train_text_tower = False        # web data: the text tower trains too (joint adversarial CLIP pre-training)
# robust fine-tuning of a CLIP image tower on labelled images (README "Robust CLIP"); init_from may
# then name an open_clip model 'name/tag' (e.g. ViT-L-14/openai) or 'name:/path/weights.bin'
loss = ''                       # '' = the data's own (labels: cross-entropy, web: contrastive) | 'tecoa' | 'fare'
tecoa_templates = ('This is a photo of a {}',)  # TeCoA's training prompts; () = the evaluation's (prompt_templates)
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
eval_dtype = 'float32'     # results.json and the final table; bf16 rounds pixels near 0/1 by ~1/255, one eval step
eval_batch_size = 0        # per rank, the final evaluation; 0 = the micro batch, lowered on a GPU to what its memory holds
# optimisation
samples = 80000            # this stage's budget, in samples seen
batch_size = 64            # global batch per optimizer step (all ranks, all micro-steps)
micro_batch_size = 0       # per rank per forward; 0 = batch_size / world size (no accumulation)
lr = 1.5e-3
min_lr = 1e-5
warmup_samples = 3000
weight_decay = 0.05
optimizer = 'adamw'        # 'adamw' | 'sgd' (TeCoA)
beta1 = 0.9
beta2 = 0.95
momentum = 0.9             # sgd only
grad_clip = 1.0
ema_decay = 0.0            # 0 = no EMA; otherwise evaluate and hand on the EMA weights
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile = False
cpu_threads = 0            # torch threads per rank on CPU; 0 = cores / ranks - workers (oversubscribed cores crawl)
seed = 0
peak_flops = 989e12        # dense bf16 peak of one GPU, for MFU (H100 SXM)
dist_timeout_s = 1800      # collectives wait this long: rank 0 saving a ViT-g checkpoint must fit in it
dry_run = False            # print this stage's plan, compute and per-GPU memory, touch nothing
plan_world = 8             # dry run: GPUs the memory plan assumes (micro batch = batch_size / plan_world if unset)
plan_memory = True         # dry run: measure activations for the memory plan (a few seconds)
gpu_mem_gib = 80           # dry run: warn when the plan needs more per GPU
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _config_keys(globals())}  # noqa: F821 (defined by configurator)
# -----------------------------------------------------------------------------

# where this stage starts (its own checkpoint, or init_from), its architecture and compute
check_config(config)
start = find_start(config)
model_args = start.model_args
fwd_macs, compute_1e10 = stage_compute(config, model_args)
if dry_run:
    print_dry_run(config, model_args, fwd_macs, compute_1e10,
                  resolved_config(config, _config_defaults, _config_origin))  # noqa: F821 (configurator)
    sys.exit(0)

# processes, precision, the run folder, the data
rank, world, device = init_distributed(device, dist_timeout_s)
agree_on_resume(start.src['samples_seen'] if start.resuming else None, out_dir)  # each node read its own out_dir
ddp, master = dist.is_initialized(), rank == 0
log = print if master else (lambda *a, **k: None)
micro, grad_accum = batch_layout(config, world, start, warn=master)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.set_num_threads(threads_per_rank(cpu_threads, num_workers, world))
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
eval_autocast = autocast if eval_dtype == 'bfloat16' else TrueFp32()  # the final table's precision
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
if master:
    prepare_out_dir(out_dir, overwrite, start.src['samples_seen'] if start.resuming else None)
train_data, val_data = data_paths(config, master)
web, clip_ft = data == 'webdataset', loss in CLIP_LOSSES
val_tf = datalib.val_transform(img_size, val_crop_pct, val_interpolation)

# the text tower and zero-shot classifier of CLIP stages (None otherwise); a web stage's image
# tower ends in the text tower's embedding width. Joint CLIP trains the text tower too (text_model,
# sharing its weights with `tower`, whose zero-shot classifier follows it: refresh_zeroshot)
tower, zs_weights, tecoa_weights = text_side(config, start, device, val_data)
if web:
    model_args['embed_out'] = tower.embed_dim
text_model = TextEncoder(tower).to(device) if train_text_tower else None

# model, optimizer, training state
torch.manual_seed(seed)
raw_model = build_model(model_args)
samples_seen, compute_prev, samples_prev = start_weights(raw_model, config, start, zs_weights, val_data, val_tf, log)
if not web:  # a labelled stage needed the text tower for its head only
    tower = None
raw_model.to(device)
fare = fare_copy(config, start, raw_model, device, torch.bfloat16 if dtype == 'bfloat16' else torch.float32) \
    if loss == 'fare' else None
contrastive = ContrastiveLoss(logit_scale_init).to(device) if web else None
opt = make_optimizer(config, raw_model, contrastive.parameters() if web else (), text_model, fused=device_type == 'cuda')
ema, ema_text = make_ema(config, start, model_args, raw_model, tower.clip if text_model else None, device)
if start.resuming:
    opt.load_state_dict(start.src['optimizer'])
    if web:
        contrastive.load_state_dict(start.src['contrastive'])
    log(f"resumed {out_dir} at {samples_seen} samples")
batches = TrainBatches(config, train_data, micro, rank, world, device, samples_seen,
                       start.src.get('data_state') if start.resuming else None, fare=fare,
                       caption_targets=caption_targets(tower, text_model, caption_embeddings, micro, device) if web else None)
val_loader = datalib.val_loader(val_data, val_tf, micro, eval_samples, rank, world, num_workers)
start.src = None  # free the checkpoint (memory-mapped: its pages go with it)
if device_type == 'cuda':
    torch.cuda.empty_cache()

fast_model = torch.compile(raw_model) if compile else raw_model  # attacks and training use this one
# gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets (no second copy)
wrap = lambda m: DDP(m, device_ids=[device] if device_type == 'cuda' else None, gradient_as_bucket_view=True)
train_model = wrap(fast_model) if ddp else fast_model
train_text = wrap(text_model) if ddp and text_model is not None else text_model
train_loss, attack_loss = stage_losses(config, contrastive, tecoa_weights, fare)
trained_params = list(raw_model.parameters()) + ([] if text_model is None else
                                                 [p for p in text_model.parameters() if p.requires_grad])
ema_pairs = [] if ema is None else list(zip(ema.parameters(), raw_model.parameters())) + \
    ([] if ema_text is None else [(e, p) for e, p in zip(ema_text.parameters(), tower.clip.parameters()) if p.requires_grad])
eval_model = ema if ema is not None else raw_model
if web or clip_ft:  # a CLIP tower is evaluated as a zero-shot classifier of the labelled val set
    eval_model = ZeroShotClassifier(eval_model, zs_weights)
stage = os.path.basename(out_dir)
step = samples_seen // batch_size  # optimizer steps taken, over the whole stage (the loop counts on)
start_step = step


def lr_at(s):
    if s < warmup_samples:
        return lr * (s + batch_size) / warmup_samples
    progress = min(1.0, (s - warmup_samples) / max(1, samples - warmup_samples))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def crossed(every, seen):
    """Whether the step that brought the run to `seen` samples crossed a multiple of `every`."""
    return every > 0 and seen // every > (seen - batch_size) // every


def refresh_zeroshot():
    """Joint CLIP: the zero-shot classifier from the text tower as it is now."""
    if text_model is not None:
        zs_weights.copy_(trained_zeroshot_weights(tower, ema_text, *zeroshot_prompts(config, val_data)))
        eval_model.weights.copy_(zs_weights)


def save_checkpoint():
    data_state = batches.state(world)  # (every rank: a collective)
    refresh_zeroshot()
    if not master:
        return
    refuse_nonfinite(trained_params, samples_seen, out_dir)
    write_checkpoint({
        'model': raw_model.state_dict(), 'model_args': model_args, 'optimizer': opt.state_dict(),
        'ema': ema.state_dict() if ema is not None else None, 'samples_seen': samples_seen,
        'compute': fwd_macs * samples_seen / 1e19, 'compute_prev': compute_prev, 'samples_prev': samples_prev,
        'stage': stage, 'config': config, 'data_state': data_state, 'world': world,
        'contrastive': contrastive.state_dict() if web else None,
        'text_model': tower.clip.state_dict() if text_model is not None else None,  # joint CLIP's text tower
        'text_ema': ema_text.state_dict() if ema_text is not None else None,
        'zeroshot_weights': zs_weights.float().cpu() if zs_weights is not None else None},  # eval's classifier
        out_dir, samples_seen, keep_ckpts)


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


sigterm_step = None  # the step during which SIGTERM arrived


def on_sigterm(signum, frame):
    global sigterm_step
    sigterm_step = step if sigterm_step is None else sigterm_step


signal.signal(signal.SIGTERM, on_sigterm)
if wandb_log and master:
    import wandb
    wandb.init(project=wandb_project, name=stage, config=config)
log(f"stage {stage}: {raw_model.describe()}, {samples} samples at {img_size}px, PGD-{pgd_steps}, "
    f"batch {batch_size} = {world} rank(s) x {micro} x {grad_accum} accumulation, {device} {dtype}")

# ----------------------------------------------------------------------------- training loop
stop_flag = StopFlag(device, ddp)
t_start = t_last = time.time()
last_log_samples = samples_seen
acc_loss = torch.zeros((), device=device)
acc_correct = torch.zeros((), device=device)
bad_images = torch.zeros((), dtype=torch.long)
first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
while samples_seen < samples:
    # ---- one optimizer step: nothing here waits for the device (tests/test_train_inprocess.py checks it)
    torch.manual_seed(seed * 1_000_003 + step * 1009 + rank)  # randomness is a function of (step, rank): exact resume
    ramp = min(1.0, (samples_seen + batch_size) / eps_warmup) if eps_warmup > 0 else 1.0
    eps_now, step_now = eps * ramp, pgd_step_size * ramp
    for group in opt.param_groups:
        group['lr'] = lr_at(samples_seen)
    for micro_step in range(grad_accum):
        x, targets, y, n_bad = batches(step, micro_step)
        bad_images += n_bad
        sync = not ddp or micro_step == grad_accum - 1  # all-reduce gradients once per optimizer step
        with autocast, no_sync((train_model, train_text), sync):
            if train_text is not None:  # joint CLIP: the captions' embeddings, once; the attack holds them fixed
                targets = train_text(targets)
            x_adv = pgd(fast_model, x, targets.detach(), attack_loss, eps_now, step_now, pgd_steps, norm,
                        pgd_random_start, mask_ratio=mask_ratio, mask_kind=mask_kind)
            logits = train_model(x_adv, mask_ratio=mask_ratio, mask_kind=mask_kind)
            micro_loss = train_loss(logits, targets) / grad_accum
            micro_loss.backward()
        acc_loss += micro_loss.detach()
        acc_correct += (predicted_labels(logits.detach(), targets.detach() if web else zs_weights if clip_ft else None)
                        == y).sum()
    first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(acc_loss), step, first_bad_step)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trained_params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=False)  # gradients stay DDP's bucket views, also in no_sync steps (the memory plan)
    if ema_pairs:
        with torch.no_grad():  # else autograd chains every step's update onto the last: a growing graph
            torch._foreach_lerp_([e for e, _ in ema_pairs], [p for _, p in ema_pairs], 1 - ema_decay)
    samples_seen += batch_size
    step += 1
    stop = stop_flag(sigterm_step is not None)
    # ---- the step ends: the log, eval and checkpoint points below may wait for the device

    done = samples_seen >= samples
    # a log point: every log_every samples, at the end, and before a SIGTERM checkpoint
    if crossed(log_every, samples_seen) or done or stop:
        sums = torch.stack([acc_loss, acc_correct, bad_images.to(device).float()])
        bad_step = first_bad_step.clone()
        if ddp:
            dist.all_reduce(sums)
            dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
        (loss_sum, correct, n_bad), bad_step = sums.tolist(), int(bad_step)
        if bad_step >= 0:
            raise SystemExit(f"loss is NaN/inf at step {bad_step} ({samples_seen} samples); "
                             f"the last good checkpoint in {out_dir} is kept (lower lr or check the data)")
        n = samples_seen - last_log_samples
        dt, t_last = time.time() - t_last, time.time()
        if n_bad > max_bad_frac * samples_seen:
            raise SystemExit(f"{int(n_bad)} unreadable images in {samples_seen} samples exceeds max_bad_frac={max_bad_frac}; "
                             f"check {train_data}")
        # every rank's loss is its share of the global mean (or, contrastive, the global loss): average over ranks
        record = {**progress(), 'loss': loss_sum / world / (n / batch_size), 'adv_acc': 100 * correct / n,
                  'lr': lr_at(samples_seen - batch_size), 'eps': eps_now, 'img_per_s': n / dt, 'bad_images': int(n_bad)}
        mfu = ''
        if device_type == 'cuda':  # FLOPs: train fwd+bwd = 3x forward, each attack step 2x forward
            flops = 2 * fwd_macs / (pgd_steps + 1) * (3 + 2 * pgd_steps) * n / dt
            record['mfu'] = flops / (peak_flops * world)
            record['peak_mem_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30  # to hold against the dry run's plan
            mfu = f", MFU {100 * record['mfu']:.1f}%, peak {record['peak_mem_gib']:.1f} GiB"
        log(f"{stage} {samples_seen}/{samples} | loss {record['loss']:.4f} | adv acc {record['adv_acc']:.1f}% | "
            f"lr {record['lr']:.2e} | eps {eps_str(eps_now, norm)} | {record['img_per_s']:.0f} img/s{mfu} | "
            f"compute {record['compute_1e10'] * 1e10:.3g} GFLOPs")
        write_log(record)
        acc_loss.zero_(), acc_correct.zero_()
        last_log_samples = samples_seen
        if stop:
            stop_flag.finish()
            save_checkpoint()
            log(f"SIGTERM at step {sigterm_step}: checkpoint written at step {step} ({samples_seen} samples); "
                f"the same command resumes")
            if ddp:
                dist.barrier()
                train_model = train_text = stop_flag = None  # nothing may hold a process group at exit
                leave_distributed()
            sys.exit(0)
    if crossed(eval_every, samples_seen) and not done:
        refresh_zeroshot()
        clean, robust, _ = evaluate_pgd(eval_model, val_loader, eval_eps or eps, eval_pgd_steps, eval_step_size,
                                        norm, autocast=autocast)
        log(f"eval {samples_seen}: clean {clean:.2f}% | PGD-{eval_pgd_steps} {robust:.2f}% ({dtype})")
        write_log({**progress(), 'clean_acc': clean, 'pgd20_acc': robust, 'eval_dtype': dtype})
    if crossed(ckpt_every, samples_seen) and not done:
        save_checkpoint()

stop_flag.finish()
if step > start_step:  # (a finished stage run again only redoes its final evaluation)
    save_checkpoint()
train_s = time.time() - t_start
refresh_zeroshot()
eval_batch = final_eval_batch(eval_batch_size, micro, model_args, img_size, eval_dtype, device)
final_loader = datalib.val_loader(val_data, val_tf, eval_batch, final_eval_samples or None, rank, world, num_workers)
clean, robust, n_eval = evaluate_pgd(eval_model, final_loader, eval_eps or eps, eval_pgd_steps, eval_step_size,
                                     norm, autocast=eval_autocast)
results = {'clean_acc': clean, 'pgd20_acc': robust, 'eps': eval_eps or eps, 'samples': samples_seen,
           'wall_s': time.time() - t_start, 'train_s': train_s, 'eval_images': n_eval, 'img_size': img_size,
           'model': model, 'compute_1e10': compute_prev + compute_1e10, 'eval_dtype': eval_dtype,
           'eval_precision': 'bf16 autocast' if eval_dtype == 'bfloat16' else 'fp32 (TF32 off)'}
write_log({**progress(), 'clean_acc': clean, 'pgd20_acc': robust, 'compute_1e10': results['compute_1e10'], 'final': True})
if master:
    with open(os.path.join(out_dir, 'results.json.tmp'), 'w') as f:
        json.dump(results, f, indent=2)
    os.replace(os.path.join(out_dir, 'results.json.tmp'), os.path.join(out_dir, 'results.json'))
    print(f"\n| stage | samples | eps | clean | PGD-{eval_pgd_steps} | wall |\n|---|---|---|---|---|---|\n"
          f"| {stage} | {samples_seen} | {eps_str(results['eps'], norm)} | {clean:.1f}% | {robust:.1f}% | "
          f"{results['wall_s']:.0f}s |")
if ddp:
    dist.barrier()  # leave together: a rank that tears down gloo while another still talks to it aborts
    train_model = train_text = stop_flag = None  # nothing may hold a process group at exit (leave_distributed)
    leave_distributed()
