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
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import augment
import data as datalib
import decode
import demo_data
import webdata
from attack import TrueFp32, evaluate_pgd, pgd
from clip_head import (ContrastiveLoss, FareLoss, ZeroShotClassifier, attack_loss_fn, head_from_zeroshot,
                       imagenet_classnames, is_clip_run, tecoa_loss_fn, zeroshot_weights)
from distributed import StopFlag, agree_on_resume, init_distributed, leave_distributed, threads_per_rank
from checkpoint import checkpoint_files, read_checkpoint, remove_temp_files, save_checkpoint as write_checkpoint
from model import PRESETS, build_model, clean_state_dict, config_from_timm_state_dict, create_model, is_convnext
from open_clip_interop import (is_open_clip_spec, load_open_clip_image_tower, load_text_tower, open_clip_text_source,
                               open_clip_tower_config)

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/demo_pre'
init_from = 'scratch'      # 'scratch' | 'resume' (this out_dir) | path to another run's out_dir or ckpt (new stage)
log_every = 8192           # samples between log lines (also when SIGTERM and NaN are checked)
eval_every = 16000         # samples between evaluations on the fixed val subset (plot.py's curves); 0 = only at the end
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
num_workers = 1            # DataLoader workers per rank (the demo decodes ~1000 img/s on one)
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
samples = 64000            # this stage's budget, in samples seen
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


# what makes a checkpoint in out_dir this stage's own (resume) rather than another stage's (refuse)
STAGE_KEYS = ('model', 'data', 'train_data', 'img_size', 'samples', 'num_classes', 'norm', 'eps', 'pgd_steps',
              'pgd_step_size', 'mask_ratio', 'mask_kind', 'loss')
INEXACT_RESUME_KEYS = ('batch_size', 'micro_batch_size', 'num_workers', 'shuffle_buffer')  # resumable, no longer bitwise


CLIP_LOSSES = ('tecoa', 'fare')
if loss not in ('',) + CLIP_LOSSES:
    raise SystemExit(f"loss='{loss}' is unknown: use '' (the data's own), 'tecoa' or 'fare'")
if loss in CLIP_LOSSES and data == 'webdataset':
    raise SystemExit(f"loss='{loss}' fine-tunes on labelled images: use data='imagefolder' (or 'demo')")


def check_same_stage(old_cfg):
    """Refuse another stage's checkpoint in out_dir in one line; warn when a key that only
    changes exactness (batch layout, workers) differs."""
    differ = [k for k in STAGE_KEYS if old_cfg.get(k) != config[k]]
    if differ:
        what = ', '.join(f"{k} {old_cfg.get(k)!r} -> {config[k]!r}" for k in differ)
        raise SystemExit(f"{out_dir} holds a checkpoint of another stage ({what}): use another out_dir, or "
                         f"--overwrite=True to start this stage afresh there")
    inexact = [f"{k} {old_cfg.get(k)!r} -> {config[k]!r}" for k in INEXACT_RESUME_KEYS if old_cfg.get(k) != config[k]]
    if inexact:
        print(f"warning: resuming with {', '.join(inexact)}: the run continues, but no longer bitwise "
              f"as an uninterrupted one (data order and per-rank randomness change)", file=sys.stderr)


# each preset's fine-tuning config: what to run after that model's pre-training (the refusal below names it)
FINETUNE_CONFIGS = {'vit_base_patch16': 'config/advxl_ft_in1k.py', 'vit_large_patch16': 'config/advxl_ft_in1k_vitl.py',
                    'vit_huge_patch14': 'config/advxl_ft_in1k_vith.py', 'vit_giant_patch14': 'config/advxl_ft_in1k_vitg.py',
                    'convnext_base': 'config/advxl_ft_in1k_convnext_b.py',
                    'convnext_large': 'config/advxl_ft_in1k_convnext_l.py', 'vit_demo_patch4': 'config/demo_ft.py'}


def stage_model_config(src_ckpt):
    """This stage's architecture: the preset, or the init_from checkpoint's architecture with
    this stage's resolution, class count and regularisation."""
    stage = dict(img_size=img_size, num_classes=num_classes, drop_path_rate=drop_path_rate, grad_ckpt=grad_ckpt)
    if src_ckpt is None:
        vit_only = {} if is_convnext(model) else dict(global_pool=global_pool)
        return asdict(create_model_meta(model, **vit_only, **stage).config)
    if 'model_args' in src_ckpt:
        args = dict(src_ckpt['model_args'])
        shape = lambda a: (tuple(a['depths']), tuple(a['dims'])) if 'dims' in a else \
            (a['patch_size'], a['embed_dim'], a['depth'])
        same = [n for n, p in PRESETS.items() if shape(PRESETS[n]) == shape(args)]
        if same and model not in same:  # this stage's memory, recipe and config file are the model's own
            ft = next((FINETUNE_CONFIGS[n] for n in same if n in FINETUNE_CONFIGS), None)
            raise SystemExit(f"init_from {init_from} holds a {same[0]} but model='{model}': use that model's "
                             f"config{f' (e.g. {ft})' if ft else ''} or --model={same[0]}")
    else:  # a timm / official AdvXL state dict: the preset named by `model` must fit it
        args = asdict(config_from_timm_state_dict(src_ckpt, arch=model))
    src_cfg = src_ckpt.get('config', {})
    keep_embed = is_clip_run(src_cfg) and (data == 'webdataset' or loss in CLIP_LOSSES)  # still a CLIP embedding
    new_label_head = {'head_bias': True} if 'head_bias' in args and not keep_embed else {}  # CLIP projections have none
    return {**args, **stage, 'embed_out': args.get('embed_out', 0) if keep_embed else 0, **new_label_head}


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


# ----------------------------------------------------------------------------- where this stage starts
# A checkpoint of this stage in out_dir wins over init_from: a requeued or restarted job runs the
# same command and continues. init_from is only where a new stage starts.
own_ckpts = [] if overwrite else checkpoint_files(out_dir)
from_open_clip = init_from not in ('scratch', 'resume') and not os.path.exists(init_from) and is_open_clip_spec(init_from)
if init_from == 'resume' and not own_ckpts:
    raise SystemExit(f"init_from='resume': no checkpoint in {out_dir} (a stage started with the same command "
                     f"resumes by itself; init_from names where a new stage starts)")
resuming = bool(own_ckpts)
src = None
if resuming:
    src = read_checkpoint(out_dir)
    check_same_stage(src.get('config', {}))
    if src['samples_seen'] >= samples and os.path.exists(os.path.join(out_dir, 'results.json')) and not dry_run:
        print(f"stage {os.path.basename(out_dir)} is complete ({src['samples_seen']} samples); its results are in "
              f"{os.path.join(out_dir, 'results.json')}")
        sys.exit(0)
elif from_open_clip:  # a pretrained open_clip image tower; weights are read below
    model_args = {**asdict(open_clip_tower_config(init_from, img_size)), 'drop_path_rate': drop_path_rate,
                  'grad_ckpt': grad_ckpt}
elif init_from not in ('scratch', 'resume'):  # a dry run checks the new stage against it as a real run does
    if dry_run and not os.path.exists(init_from):
        raise SystemExit(f"init_from {init_from} not found: this stage starts from that run's model, so the dry run "
                         f"needs it too; run that stage first, or plan this stage alone with --init_from=scratch")
    src = read_checkpoint(init_from)
if resuming or not from_open_clip:
    model_args = dict(src['model_args']) if resuming else stage_model_config(src)
try:
    fwd_macs, compute_1e10 = stage_compute(model_args)
except ValueError as e:  # e.g. mask_ratio on a ConvNeXt: the model says why
    raise SystemExit(f"mask_ratio={mask_ratio}: {e}")

if dry_run:
    print("config (where it differs from train.py's defaults, and what set it):")
    print('\n'.join(resolved_config(config, _config_defaults, _config_origin)))  # noqa: F821 (configurator)
    with torch.device('meta'):
        arch = build_model(model_args).describe()
    print(f"stage {os.path.basename(out_dir)}: {arch}, {samples / 1e6:g}M samples at {img_size}px "
          f"(mask {mask_ratio:g} {mask_kind}), "
          f"PGD-{pgd_steps} {norm} eps {eps_str(eps)} step {eps_str(pgd_step_size)}, "
          f"{fwd_macs / (pgd_steps + 1) / 1e9:.2f} GMACs forward/sample, batch {batch_size}, "
          f"{math.ceil(samples / batch_size)} steps")
    print(f"compute_1e10_gflops={compute_1e10:.6g}")
    if plan_memory:
        import memplan
        micro_plan = micro_batch_size or batch_size // plan_world
        plan_dtype = dtype if device.startswith('cuda') else 'bfloat16'  # the plan is for the GPU run
        plan = memplan.memory_plan(model_args, micro_plan, img_size, pgd_steps, mask_ratio, mask_kind, plan_dtype,
                                   ema=ema_decay > 0, text_tower=text_tower if data == 'webdataset' else None,
                                   frozen_copy=loss == 'fare', eval_dtype=eval_dtype,
                                   budget=gpu_mem_gib * memplan.GiB, eval_batch=eval_batch_size)
        print(f"memory per GPU at {plan_world} GPUs, micro batch {micro_plan} "
              f"({batch_size // (micro_plan * plan_world)} accumulation), {plan_dtype}, grad_ckpt "
              f"{model_args.get('grad_ckpt')}, evaluation batch {plan['eval_batch']} in {eval_dtype}: "
              f"{memplan.format_plan(plan)}")
        peak = plan['peak'] / memplan.GiB
        if peak > gpu_mem_gib:
            print(f"warning: the plan needs {peak:.1f} GiB per GPU, more than gpu_mem_gib={gpu_mem_gib}: lower "
                  f"micro_batch_size or set grad_ckpt=True")
        print(f"peak_mem_gib={peak:.2f} world={plan_world}")
    sys.exit(0)

# ----------------------------------------------------------------------------- setup
rank, world, device = init_distributed(device, dist_timeout_s)
agree_on_resume(src['samples_seen'] if resuming else None, out_dir)  # each node read its own out_dir
ddp = dist.is_initialized()
master = rank == 0
log = print if master else (lambda *a, **k: None)
micro = micro_batch_size or batch_size // world
grad_accum = batch_size // (micro * world)
if grad_accum * micro * world != batch_size:
    raise SystemExit(f"batch_size {batch_size} is not a multiple of micro_batch_size {micro} x {world} ranks")
if resuming and src.get('world', world) != world and master:
    print(f"warning: resuming with {world} rank(s) where the checkpoint ran {src['world']}: the run continues, but "
          f"no longer bitwise as an uninterrupted one (data order and per-rank randomness change)", file=sys.stderr)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.set_num_threads(threads_per_rank(cpu_threads, num_workers, world))
torch_dtype = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
eval_autocast = autocast if eval_dtype == 'bfloat16' else TrueFp32()  # the final table's precision
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
if master:
    os.makedirs(out_dir, exist_ok=True)
    remove_temp_files(out_dir)  # half-written checkpoints of a process killed mid-save
    if overwrite:
        for f in checkpoint_files(out_dir) + [os.path.join(out_dir, n) for n in ('log.jsonl', 'results.json')]:
            if os.path.exists(f):
                os.remove(f)
    if resuming:  # drop log records past the checkpoint: this run writes them again
        log_path = os.path.join(out_dir, 'log.jsonl')
        if os.path.exists(log_path):
            kept = [l for l in open(log_path) if l.strip() and not json.loads(l).get('final')
                    and json.loads(l)['samples'] <= src['samples_seen']]
            with open(log_path + '.tmp', 'w') as f:
                f.writelines(kept)
            os.replace(log_path + '.tmp', log_path)

# data: the demo (anything under data_cache/demo) is generated once by rank 0, the others wait
if data not in ('demo', 'imagefolder', 'shards', 'webdataset'):
    raise SystemExit(f"data='{data}' is unknown: use 'demo', 'imagefolder', 'shards' or 'webdataset'")
if data == 'demo':
    train_data, val_data = train_data or f'{demo_data.DEMO_ROOT}/train', val_data or f'{demo_data.DEMO_ROOT}/val'
if any(p.startswith(demo_data.DEMO_ROOT) for p in (train_data, val_data)):
    if master:
        demo_data.ensure_demo()
    if ddp:
        dist.barrier()
web, shards = data == 'webdataset', data == 'shards'  # shards: labelled, the web path's resumable stream
val_tf = datalib.val_transform(img_size, val_crop_pct, val_interpolation)

# The frozen text tower: web data's targets, the zero-shot head of a labelled stage after a CLIP
# stage, and TeCoA's / FARE's zero-shot classifier. It is the one the tower was trained with: this
# run's own (web, or resumed), the source run's, or the open_clip model's; the checkpoint's config
# names it, so eval_autoattack rebuilds the same classifier.
clip_ft = loss in CLIP_LOSSES
src_cfg = (src or {}).get('config', {})
tower_cfg = None
if web or (resuming and clip_ft):
    tower_cfg = config if web else src_cfg
elif clip_ft and from_open_clip:
    name, tag = open_clip_text_source(init_from)
    tower_cfg = {**config, 'text_tower': name, 'text_pretrained': tag or ''}
elif src is not None and is_clip_run(src_cfg):
    tower_cfg = src_cfg
elif clip_ft:
    raise SystemExit(f"loss='{loss}' starts from a CLIP tower: init_from must name an open_clip model "
                     f"(e.g. ViT-B-32/openai) or a run trained on web data or with TeCoA/FARE")
tower = None
if tower_cfg is not None:
    for k in ('text_tower', 'text_pretrained', 'prompt_templates'):
        config[k] = tower_cfg[k]
    config['text_seed'] = tower_cfg.get('text_seed', tower_cfg['seed'])  # a random tower's init (demo, tests)
    tower = load_text_tower(config['text_tower'], config['text_pretrained'] or None, device,
                            precision='bf16' if dtype == 'bfloat16' else 'fp32', seed=config['text_seed'])
    classnames = imagenet_classnames() if num_classes == 1000 else datalib.class_names(val_data)
    zs_weights = zeroshot_weights(tower, classnames, list(config['prompt_templates']) or None).to(device)
    if loss == 'tecoa':
        tecoa_weights = zeroshot_weights(tower, classnames, list(tecoa_templates) or list(config['prompt_templates'])
                                         or None).to(device)
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


def start_new_stage(model, src):
    """Weights only from another run or file (pos embed resized; a new head if the task
    changed); returns (new_head, compute and samples of the stages before)."""
    sd = clean_state_dict(src.get('ema') or src.get('model', src))  # a new stage takes the EMA weights if kept
    key = model.classifier_key()
    new_head = sd[key + '.weight'].shape != model.get_classifier().weight.shape
    model.load_weights(sd, skip_head=new_head)
    if new_head and tower is not None and not web:  # web -> labels: start from the zero-shot classifier
        bias = sd.get(key + '.bias')
        proj = torch.nn.Linear(*sd[key + '.weight'].shape[::-1], bias=bias is not None)
        proj.load_state_dict({'weight': sd[key + '.weight'], **({'bias': bias} if bias is not None else {})})
        model.set_classifier(head_from_zeroshot(torch.nn.ModuleDict({'head': proj}), zs_weights.cpu(),
                                                feature_norm=zeroshot_feature_norm(model, proj)))
        log("init_from: class head initialised from the CLIP zero-shot classifier")
    return new_head, src.get('compute_prev', 0.0) + src.get('compute', 0.0), \
        src.get('samples_prev', 0) + src.get('samples_seen', 0)


# model, optimizer, state
torch.manual_seed(seed)
raw_model = build_model(model_args)
samples_seen, compute_prev, samples_prev = 0, 0.0, 0  # *_prev: earlier stages, for the logs' totals
if resuming:  # the trained weights (the EMA, if any, is restored below)
    raw_model.load_weights(src['model'])
    samples_seen, compute_prev, samples_prev = src['samples_seen'], src['compute_prev'], src.get('samples_prev', 0)
elif src is not None:
    new_head, compute_prev, samples_prev = start_new_stage(raw_model, src)
    log(f"init_from {init_from}: {'new head, ' if new_head else ''}{raw_model.describe()}")
elif from_open_clip:
    raw_model.load_weights(load_open_clip_image_tower(init_from, img_size=img_size).state_dict())
    log(f"init_from {init_from}: open_clip image tower, {raw_model.describe()}")
if tower is not None and not web:  # a labelled stage needed the text tower for its head only
    tower = None
raw_model.to(device)
fare = None
if loss == 'fare':  # phi_orig: the starting tower, frozen (a resumed run rebuilds it from init_from)
    if resuming:
        start = build_model(model_args)
        if from_open_clip:
            start.load_weights(load_open_clip_image_tower(init_from, img_size=img_size).state_dict())
        else:
            start_new_stage(start, read_checkpoint(init_from))
        fare = FareLoss(start, device, torch_dtype)
    else:
        fare = FareLoss(raw_model, device, torch_dtype)
contrastive = ContrastiveLoss(logit_scale_init).to(device) if web else None
decay = [p for n, p in raw_model.named_parameters() if p.ndim >= 2 and 'pos_embed' not in n and 'cls_token' not in n]
no_decay = [p for n, p in raw_model.named_parameters() if not (p.ndim >= 2 and 'pos_embed' not in n and 'cls_token' not in n)]
no_decay += list(contrastive.parameters()) if web else []  # the temperature
groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
if optimizer not in ('adamw', 'sgd'):
    raise SystemExit(f"optimizer='{optimizer}' is unknown: use 'adamw' or 'sgd'")
opt = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), fused=device_type == 'cuda') \
    if optimizer == 'adamw' else torch.optim.SGD(groups, lr=lr, momentum=momentum)
ema = None
if ema_decay > 0:
    ema = build_model(model_args).to(device).requires_grad_(False)
    ema.load_state_dict(src['ema'] if resuming and src.get('ema') else raw_model.state_dict())
if resuming:
    opt.load_state_dict(src['optimizer'])
    if web:
        contrastive.load_state_dict(src['contrastive'])
    log(f"resumed {out_dir} at {samples_seen} samples")
data_state = src.get('data_state') if resuming else None
del src  # free the checkpoint (memory-mapped: its pages go with it)
if device_type == 'cuda':
    torch.cuda.empty_cache()

fast_model = torch.compile(raw_model) if compile else raw_model  # attacks and training use this one
# gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets (no second copy)
train_model = DDP(fast_model, device_ids=[device] if device_type == 'cuda' else None,
                  gradient_as_bucket_view=True) if ddp else fast_model

aug = dict(scale=tuple(crop_scale), hflip=0.5 * hflip, auto_augment=auto_augment, interpolation=train_interpolation)
if web or shards:
    train_loader = webdata.web_loader(train_data, img_size, micro, rank, world, seed, num_workers, state=data_state,
                                      shuffle_buffer=shuffle_buffer, labelled=shards, uint8=True,
                                      pin_memory=device_type == 'cuda', **aug)
if web:
    captions = None
    if caption_embeddings:
        from clip_head import CaptionEmbeddings
        captions = CaptionEmbeddings(caption_embeddings)
elif not shards:
    train_tf = decode.train_transform(img_size, tuple(crop_scale), hflip, auto_augment, train_interpolation)
    train_loader = datalib.image_folder_loader(train_data, train_tf, micro, rank, world, seed,
                                               start=samples_seen // world, num_workers=num_workers)
val_loader = datalib.val_loader(val_data, val_tf, micro, eval_samples, rank, world, num_workers)
train_iter = iter(train_loader)
stage = os.path.basename(out_dir)
step = samples_seen // batch_size  # optimizer steps taken, over the whole stage (the loop counts on)
start_step = step


def loss_fn(logits, targets):
    return F.cross_entropy(logits.float(), targets)


# the attack maximises the stage's own loss (Eq. 3 for web data; TeCoA's and FARE's as their papers do)
if web:
    train_loss, attack_loss = contrastive, attack_loss_fn(contrastive)
elif loss == 'tecoa':
    train_loss = attack_loss = tecoa_loss_fn(tecoa_weights)
elif loss == 'fare':
    train_loss = attack_loss = fare
else:
    train_loss = attack_loss = loss_fn


def to_device(t):
    return augment.to_device(t, device)


def next_batch(step, micro_step):
    """(images, targets for the loss, labels for the accuracy, unreadable images skipped)."""
    if web:  # targets: the captions' fixed text embeddings; accuracy: in-batch image->text retrieval
        b = next(train_iter)
        x = to_device(b.image)
        if captions is not None:
            emb = captions[b.key]
            txt = to_device(emb.pin_memory() if device_type == 'cuda' else emb)
        else:
            txt = tower.encode(b.text, batch_size=micro)  # fixed shapes: the same bits after a resume
        return x, txt, torch.arange(len(x), device=device), sum(train_loader.skipped_last.values())
    if shards:
        b = next(train_iter)
        x, y, n_bad = b.image, b.label, sum(train_loader.skipped_last.values())
    else:
        x, y, n_bad = next(train_iter)
    x, y = to_device(x), to_device(y)
    s = (seed * 1_000_003 + step * 1009 + rank) * 64 + micro_step  # the device augmentation's draws: exact resume
    x = augment.random_erase(x, reprob, seed=s)
    x, targets = augment.mix_batch(x, augment.soft_targets(y, num_classes, label_smoothing), mixup, cutmix, seed=s)
    if fare is not None:  # FARE's target: the original tower's embedding of the clean image
        targets = fare.targets(x)
    return x, targets, y, n_bad


def predictions(out, targets):
    if web:  # in-batch image -> caption retrieval
        return (F.normalize(out.float(), dim=-1) @ targets.T).argmax(1)
    return (F.normalize(out.float(), dim=-1) @ zs_weights.T).argmax(1) if clip_ft else out.argmax(1)


def final_eval_batch():
    """The final evaluation's batch per rank: eval_batch_size, else the micro batch, lowered on a GPU
    to what its free memory holds beside the training state (fp32 PGD needs more than bf16 training)."""
    if eval_batch_size or device_type != 'cuda':
        return eval_batch_size or micro
    import memplan
    torch.cuda.empty_cache()
    line = memplan.eval_activation_line(model_args, img_size, eval_dtype)
    return memplan.fitting_eval_batch(line, 0.9 * torch.cuda.mem_get_info(device)[0], micro)  # 10%: fragmentation


def crossed(every, seen):
    """Whether the step that brought the run to `seen` samples crossed a multiple of `every`."""
    return every > 0 and seen // every > (seen - batch_size) // every


def lr_at(s):
    if s < warmup_samples:
        return lr * (s + batch_size) / warmup_samples
    progress = min(1.0, (s - warmup_samples) / max(1, samples - warmup_samples))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def save_checkpoint():
    states = None
    if web or shards:  # every rank's stream position, so each can resume exactly
        states = [None] * world
        dist.all_gather_object(states, train_loader.state_dict()) if ddp else states.__setitem__(0, train_loader.state_dict())
        states = webdata.merge_states(states)
    if not master:
        return
    if not torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()]).all():  # one host sync
        raise SystemExit(f"weights are NaN/inf at {samples_seen} samples: not overwriting the last good checkpoint "
                         f"in {out_dir} (lower lr or check the data)")
    ckpt = {'model': raw_model.state_dict(), 'model_args': model_args, 'optimizer': opt.state_dict(),
            'ema': ema.state_dict() if ema is not None else None, 'samples_seen': samples_seen,
            'compute': fwd_macs * samples_seen / 1e19, 'compute_prev': compute_prev, 'samples_prev': samples_prev,
            'stage': os.path.basename(out_dir), 'config': config, 'data_state': states, 'world': world,
            'contrastive': contrastive.state_dict() if web else None,
            'zeroshot_weights': zs_weights.float().cpu() if tower_cfg is not None else None}  # eval's classifier
    write_checkpoint(ckpt, out_dir, samples_seen, keep_ckpts)


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
    if sigterm_step is None:
        sigterm_step = step


signal.signal(signal.SIGTERM, on_sigterm)
if wandb_log and master:
    import wandb
    wandb.init(project=wandb_project, name=os.path.basename(out_dir), config=config)

eval_model = ema if ema is not None else raw_model
if web or clip_ft:  # a CLIP tower is evaluated as a zero-shot classifier of the labelled val set
    eval_model = ZeroShotClassifier(eval_model, zs_weights)
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
        x, targets, y, n_bad = next_batch(step, micro_step)
        bad_images += n_bad
        with autocast:
            x_adv = pgd(fast_model, x, targets, attack_loss, eps_now, step_now, pgd_steps, norm, pgd_random_start,
                        mask_ratio=mask_ratio, mask_kind=mask_kind)
            sync = not ddp or micro_step == grad_accum - 1  # all-reduce gradients once per optimizer step
            with train_model.no_sync() if not sync else nullcontext():
                logits = train_model(x_adv, mask_ratio=mask_ratio, mask_kind=mask_kind)
                micro_loss = train_loss(logits, targets) / grad_accum
                micro_loss.backward()
        acc_loss += micro_loss.detach()
        acc_correct += (predictions(logits.detach(), targets) == y).sum()
    first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(acc_loss), step, first_bad_step)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=False)  # gradients stay DDP's bucket views, also in no_sync steps (the memory plan)
    if ema is not None:
        with torch.no_grad():  # else autograd chains every step's update onto the last: a growing graph
            torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - ema_decay)
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
            f"lr {record['lr']:.2e} | eps {eps_str(eps_now)} | {record['img_per_s']:.0f} img/s{mfu} | "
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
                train_model = stop_flag = None  # nothing may hold a process group at exit (leave_distributed)
                leave_distributed()
            sys.exit(0)
    if crossed(eval_every, samples_seen) and not done:
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
final_loader = datalib.val_loader(val_data, val_tf, final_eval_batch(), final_eval_samples or None, rank, world,
                                  num_workers)
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
          f"| {stage} | {samples_seen} | {eps_str(results['eps'])} | {clean:.1f}% | {robust:.1f}% | "
          f"{results['wall_s']:.0f}s |")
if ddp:
    dist.barrier()  # leave together: a rank that tears down gloo while another still talks to it aborts
    train_model = stop_flag = None  # nothing may hold a process group at exit (leave_distributed)
    leave_distributed()
