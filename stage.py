"""
Where a training stage starts, resolved before its first step: this stage's own checkpoint
(resume) or another run's (init_from), the architecture and compute, the dry run's plan, the
batch layout and data paths, the text side of CLIP stages, the starting weights, FARE's frozen
copy, the optimizer, the EMA copies and the losses. train.py calls these functions with its
config; the step itself stays in train.py.
"""
import copy
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import data as datalib
from attack import soft_cross_entropy
from checkpoint import checkpoint_files, read_checkpoint, remove_temp_files
from clip_head import (FareLoss, attack_loss_fn, head_from_zeroshot, imagenet_classnames, is_clip_run,
                       tecoa_loss_fn, text_param_groups, zeroshot_weights)
from demo_data import DEMO_ROOT, ensure_demo
from model import PRESETS, build_model, clean_state_dict, config_from_timm_state_dict, create_model, is_convnext
from open_clip_interop import (is_open_clip_spec, load_open_clip_image_tower, load_text_tower, open_clip_text_source,
                               open_clip_tower_config)

# what makes a checkpoint in out_dir this stage's own (resume) rather than another stage's (refuse)
STAGE_KEYS = ('model', 'data', 'train_data', 'img_size', 'samples', 'num_classes', 'norm', 'eps', 'pgd_steps',
              'pgd_step_size', 'mask_ratio', 'mask_kind', 'loss')
INEXACT_RESUME_KEYS = ('batch_size', 'micro_batch_size', 'num_workers', 'shuffle_buffer')  # resumable, no longer bitwise
CLIP_LOSSES = ('tecoa', 'fare')

# each preset's fine-tuning config: what to run after that model's pre-training (the refusal below names it)
FINETUNE_CONFIGS = {'vit_base_patch16': 'config/advxl_ft_in1k.py', 'vit_large_patch16': 'config/advxl_ft_in1k_vitl.py',
                    'vit_huge_patch14': 'config/advxl_ft_in1k_vith.py', 'vit_giant_patch14': 'config/advxl_ft_in1k_vitg.py',
                    'convnext_base': 'config/advxl_ft_in1k_convnext_b.py',
                    'convnext_large': 'config/advxl_ft_in1k_convnext_l.py', 'vit_demo_patch4': 'config/demo_ft.py'}


def check_config(cfg):
    """One-line refusals of values no stage accepts."""
    if cfg['loss'] not in ('',) + CLIP_LOSSES:
        raise SystemExit(f"loss='{cfg['loss']}' is unknown: use '' (the data's own), 'tecoa' or 'fare'")
    if cfg['loss'] in CLIP_LOSSES and cfg['data'] == 'webdataset':
        raise SystemExit(f"loss='{cfg['loss']}' fine-tunes on labelled images: use data='imagefolder' (or 'demo')")
    if cfg['data'] not in ('demo', 'imagefolder', 'shards', 'webdataset'):
        raise SystemExit(f"data='{cfg['data']}' is unknown: use 'demo', 'imagefolder', 'shards' or 'webdataset'")
    if cfg['train_text_tower'] and cfg['data'] != 'webdataset':
        raise SystemExit("train_text_tower=True trains the text tower on captions: use data='webdataset'")
    if cfg['train_text_tower'] and cfg['caption_embeddings']:
        raise SystemExit("caption_embeddings holds a frozen text tower's embeddings: a trained text tower (train_text_tower="
                         "True) encodes every caption as it trains; drop caption_embeddings")
    if cfg['optimizer'] not in ('adamw', 'sgd'):
        raise SystemExit(f"optimizer='{cfg['optimizer']}' is unknown: use 'adamw' or 'sgd'")


def eps_str(v, norm):
    return f"{v * 255:.3g}/255" if norm == 'Linf' else f"{v:.3g}"  # L_inf radii read best in pixel levels


def check_same_stage(old_cfg, cfg):
    """Refuse another stage's checkpoint in out_dir in one line; warn when a key that only
    changes exactness (batch layout, workers) differs."""
    differ = [k for k in STAGE_KEYS if old_cfg.get(k) != cfg[k]]
    if differ:
        what = ', '.join(f"{k} {old_cfg.get(k)!r} -> {cfg[k]!r}" for k in differ)
        raise SystemExit(f"{cfg['out_dir']} holds a checkpoint of another stage ({what}): use another out_dir, or "
                         f"--overwrite=True to start this stage afresh there")
    inexact = [f"{k} {old_cfg.get(k)!r} -> {cfg[k]!r}" for k in INEXACT_RESUME_KEYS if old_cfg.get(k) != cfg[k]]
    if inexact:
        print(f"warning: resuming with {', '.join(inexact)}: the run continues, but no longer bitwise "
              f"as an uninterrupted one (data order and per-rank randomness change)", file=sys.stderr)


def create_model_meta(name, **kw):
    try:
        with torch.device('meta'):
            return create_model(name, **kw)
    except ValueError as e:
        raise SystemExit(f"model: {e}")


def stage_model_config(cfg, src_ckpt):
    """This stage's architecture: the preset, or the init_from checkpoint's architecture with
    this stage's resolution, class count and regularisation."""
    model = cfg['model']
    stage = {k: cfg[k] for k in ('img_size', 'num_classes', 'drop_path_rate', 'grad_ckpt')}
    if src_ckpt is None:
        vit_only = {} if is_convnext(model) else dict(global_pool=cfg['global_pool'])
        return asdict(create_model_meta(model, **vit_only, **stage).config)
    if 'model_args' in src_ckpt:
        args = dict(src_ckpt['model_args'])
        shape = lambda a: (tuple(a['depths']), tuple(a['dims'])) if 'dims' in a else \
            (a['patch_size'], a['embed_dim'], a['depth'])
        same = [n for n, p in PRESETS.items() if shape(PRESETS[n]) == shape(args)]
        if same and model not in same:  # this stage's memory, recipe and config file are the model's own
            ft = next((FINETUNE_CONFIGS[n] for n in same if n in FINETUNE_CONFIGS), None)
            raise SystemExit(f"init_from {cfg['init_from']} holds a {same[0]} but model='{model}': use that model's "
                             f"config{f' (e.g. {ft})' if ft else ''} or --model={same[0]}")
    else:  # a timm / official AdvXL state dict: the preset named by `model` must fit it
        args = asdict(config_from_timm_state_dict(src_ckpt, arch=model))
    src_cfg = src_ckpt.get('config', {})
    keep_embed = is_clip_run(src_cfg) and (cfg['data'] == 'webdataset' or cfg['loss'] in CLIP_LOSSES)  # a CLIP embedding
    new_label_head = {'head_bias': True} if 'head_bias' in args and not keep_embed else {}  # CLIP projections have none
    return {**args, **stage, 'embed_out': args.get('embed_out', 0) if keep_embed else 0, **new_label_head}


def stage_compute(cfg, model_args):
    """(forward MACs x (PGD steps + 1) per sample, the stage's compute in 1e10 GFLOPs: the paper's
    Table 2 column)."""
    with torch.device('meta'):
        m = build_model(model_args)
    try:
        per_sample = m.flops(cfg['img_size'], cfg['mask_ratio'], cfg['mask_kind']) * (cfg['pgd_steps'] + 1)
    except ValueError as e:  # e.g. mask_ratio on a ConvNeXt: the model says why
        raise SystemExit(f"mask_ratio={cfg['mask_ratio']}: {e}")
    return per_sample, per_sample * cfg['samples'] / 1e19


@dataclass
class Start:
    """Where this stage starts: src is this stage's checkpoint (resuming) or init_from's, if any."""
    src: dict
    resuming: bool
    from_open_clip: bool
    model_args: dict


def find_start(cfg):
    """A checkpoint of this stage in out_dir wins over init_from: a requeued or restarted job runs
    the same command and continues. init_from is only where a new stage starts. A finished stage
    says so and exits."""
    out_dir, init_from = cfg['out_dir'], cfg['init_from']
    own_ckpts = [] if cfg['overwrite'] else checkpoint_files(out_dir)
    from_open_clip = init_from not in ('scratch', 'resume') and not os.path.exists(init_from) \
        and is_open_clip_spec(init_from)
    if init_from == 'resume' and not own_ckpts:
        raise SystemExit(f"init_from='resume': no checkpoint in {out_dir} (a stage started with the same command "
                         f"resumes by itself; init_from names where a new stage starts)")
    resuming, src = bool(own_ckpts), None
    if resuming:
        src = read_checkpoint(out_dir)
        check_same_stage(src.get('config', {}), cfg)
        results = os.path.join(out_dir, 'results.json')
        if src['samples_seen'] >= cfg['samples'] and os.path.exists(results) and not cfg['dry_run']:
            print(f"stage {os.path.basename(out_dir)} is complete ({src['samples_seen']} samples); its results are in "
                  f"{results}")
            sys.exit(0)
        return Start(src, True, from_open_clip, dict(src['model_args']))
    if from_open_clip:  # a pretrained open_clip image tower; its weights are read in start_weights
        model_args = {**asdict(open_clip_tower_config(init_from, cfg['img_size'])),
                      'drop_path_rate': cfg['drop_path_rate'], 'grad_ckpt': cfg['grad_ckpt']}
        return Start(None, False, True, model_args)
    if init_from not in ('scratch', 'resume'):  # a dry run checks the new stage against it as a real run does
        if cfg['dry_run'] and not os.path.exists(init_from):
            raise SystemExit(f"init_from {init_from} not found: this stage starts from that run's model, so the dry "
                             f"run needs it too; run that stage first, or plan this stage alone with --init_from=scratch")
        src = read_checkpoint(init_from)
    return Start(src, False, False, stage_model_config(cfg, src))


def print_dry_run(cfg, model_args, fwd_macs, compute_1e10, resolved_lines):
    """The stage's resolved config, plan, compute and per-GPU memory; touches no data."""
    import memplan
    norm, samples, batch_size = cfg['norm'], cfg['samples'], cfg['batch_size']
    print("config (where it differs from train.py's defaults, and what set it):")
    print('\n'.join(resolved_lines))
    with torch.device('meta'):
        arch = build_model(model_args).describe()
    print(f"stage {os.path.basename(cfg['out_dir'])}: {arch}, {samples / 1e6:g}M samples at {cfg['img_size']}px "
          f"(mask {cfg['mask_ratio']:g} {cfg['mask_kind']}), PGD-{cfg['pgd_steps']} {norm} eps {eps_str(cfg['eps'], norm)} "
          f"step {eps_str(cfg['pgd_step_size'], norm)}, {fwd_macs / (cfg['pgd_steps'] + 1) / 1e9:.2f} GMACs "
          f"forward/sample, batch {batch_size}, {math.ceil(samples / batch_size)} steps")
    print(f"compute_1e10_gflops={compute_1e10:.6g}")
    if not cfg['plan_memory']:
        return
    world, budget = cfg['plan_world'], cfg['gpu_mem_gib']
    micro = cfg['micro_batch_size'] or batch_size // world
    plan_dtype = cfg['dtype'] if cfg['device'].startswith('cuda') else 'bfloat16'  # the plan is for the GPU run
    plan = memplan.memory_plan(model_args, micro, cfg['img_size'], cfg['pgd_steps'], cfg['mask_ratio'],
                               cfg['mask_kind'], plan_dtype, ema=cfg['ema_decay'] > 0,
                               text_tower=cfg['text_tower'] if cfg['data'] == 'webdataset' else None,
                               frozen_copy=cfg['loss'] == 'fare', eval_dtype=cfg['eval_dtype'],
                               budget=budget * memplan.GiB, eval_batch=cfg['eval_batch_size'],
                               train_text=cfg['train_text_tower'])
    print(f"memory per GPU at {world} GPUs, micro batch {micro} ({batch_size // (micro * world)} accumulation), "
          f"{plan_dtype}, grad_ckpt {model_args.get('grad_ckpt')}, evaluation batch {plan['eval_batch']} in "
          f"{cfg['eval_dtype']}: {memplan.format_plan(plan)}")
    peak = plan['peak'] / memplan.GiB
    if peak > budget:
        print(f"warning: the plan needs {peak:.1f} GiB per GPU, more than gpu_mem_gib={budget}: lower "
              f"micro_batch_size or set grad_ckpt=True")
    print(f"peak_mem_gib={peak:.2f} world={world}")


def batch_layout(cfg, world, start, warn=True):
    """(micro batch per rank, accumulation steps) for the global batch_size on `world` ranks."""
    batch_size = cfg['batch_size']
    micro = cfg['micro_batch_size'] or batch_size // world
    grad_accum = batch_size // (micro * world)
    if grad_accum * micro * world != batch_size:
        raise SystemExit(f"batch_size {batch_size} is not a multiple of micro_batch_size {micro} x {world} ranks")
    if warn and start.resuming and start.src.get('world', world) != world:
        print(f"warning: resuming with {world} rank(s) where the checkpoint ran {start.src['world']}: the run continues, "
              f"but no longer bitwise as an uninterrupted one (data order and per-rank randomness change)",
              file=sys.stderr)
    return micro, grad_accum


def data_paths(cfg, master):
    """(train, val) data of the stage. The demo's (anything under data_cache/demo) is generated
    once, by rank 0, while the others wait."""
    train, val = cfg['train_data'], cfg['val_data']
    if cfg['data'] == 'demo':
        train, val = train or f'{DEMO_ROOT}/train', val or f'{DEMO_ROOT}/val'
    if any(p.startswith(DEMO_ROOT) for p in (train, val)):
        if master:
            ensure_demo()
        if dist.is_initialized():
            dist.barrier()
    return train, val


def prepare_out_dir(out_dir, overwrite, resumed_samples=None):
    """Rank 0: the folder, no half-written checkpoints, and a log that ends at the checkpoint."""
    os.makedirs(out_dir, exist_ok=True)
    remove_temp_files(out_dir)  # half-written checkpoints of a process killed mid-save
    if overwrite:
        for f in checkpoint_files(out_dir) + [os.path.join(out_dir, n) for n in ('log.jsonl', 'results.json')]:
            if os.path.exists(f):
                os.remove(f)
    log_path = os.path.join(out_dir, 'log.jsonl')
    if resumed_samples is not None and os.path.exists(log_path):  # records past the checkpoint: written again
        kept = [l for l in open(log_path) if l.strip() and not json.loads(l).get('final')
                and json.loads(l)['samples'] <= resumed_samples]
        with open(log_path + '.tmp', 'w') as f:
            f.writelines(kept)
        os.replace(log_path + '.tmp', log_path)


def text_side(cfg, start, device, val_data):
    """The frozen text tower and its zero-shot classifier: web data's targets, the zero-shot head of
    a labelled stage after a CLIP stage, and TeCoA's / FARE's classifier. It is the one the tower
    was trained with: this run's own (web, or resumed), the source run's, or the open_clip model's.
    cfg's text keys are set to it, so the checkpoint names it and eval_autoattack rebuilds the same
    classifier. Returns (tower, zero-shot weights, TeCoA's weights), Nones where there is none."""
    loss, web = cfg['loss'], cfg['data'] == 'webdataset'
    clip_ft = loss in CLIP_LOSSES
    src_cfg = (start.src or {}).get('config', {})
    if web or (start.resuming and clip_ft):
        tower_cfg = cfg if web else src_cfg
    elif clip_ft and start.from_open_clip:
        name, tag = open_clip_text_source(cfg['init_from'])
        tower_cfg = {**cfg, 'text_tower': name, 'text_pretrained': tag or ''}
    elif start.src is not None and is_clip_run(src_cfg):
        tower_cfg = src_cfg
    elif clip_ft:
        raise SystemExit(f"loss='{loss}' starts from a CLIP tower: init_from must name an open_clip model "
                         f"(e.g. ViT-B-32/openai) or a run trained on web data or with TeCoA/FARE")
    else:
        return None, None, None
    for k in ('text_tower', 'text_pretrained', 'prompt_templates'):
        cfg[k] = tower_cfg[k]
    cfg['text_seed'] = tower_cfg.get('text_seed', tower_cfg['seed'])  # a random tower's init (demo, tests)
    trained = cfg['train_text_tower'] or (start.src or {}).get('text_model') is not None
    tower = load_text_tower(cfg['text_tower'], cfg['text_pretrained'] or None, device,  # a trained one: fp32 weights
                            precision='bf16' if cfg['dtype'] == 'bfloat16' and not trained else 'fp32',
                            seed=cfg['text_seed'])
    text_src = start.src if start.src is not None and start.src.get('text_model') is not None else None
    if text_src is not None and text_src.get('config', {}).get('text_tower') == cfg['text_tower']:
        tower.clip.load_state_dict(text_src['text_model'])  # the text tower a joint CLIP run trained
    classnames, prompts = zeroshot_prompts(cfg, val_data)
    zs_weights = zeroshot_weights(tower, classnames, prompts).to(device)
    tecoa_weights = zeroshot_weights(tower, classnames, list(cfg['tecoa_templates']) or prompts).to(device) \
        if loss == 'tecoa' else None
    return tower, zs_weights, tecoa_weights


def zeroshot_prompts(cfg, val_data):
    """(class names, prompt templates) of the stage's zero-shot classifier."""
    classnames = imagenet_classnames() if cfg['num_classes'] == 1000 else datalib.class_names(val_data)
    return classnames, list(cfg['prompt_templates']) or None


@torch.no_grad()
def zeroshot_feature_norm(backbone, proj, val_data, val_tf):
    """Mean |image embedding| over a few val images: scales the zero-shot head's logits."""
    ds = datalib.ImageFolderSafe(val_data, val_tf)
    x = torch.stack([item[0] for item in (ds[(i, 0)] for i in range(min(32, len(ds)))) if item is not None])
    z = proj(backbone.eval().forward_features(x))
    backbone.train()
    return z.norm(dim=-1).mean().item()


def start_new_stage(model, src, zs_weights=None, val_data=None, val_tf=None, log=print):
    """Weights only from another run or file (pos embed resized; a new head if the task changed;
    with zs_weights, a CLIP tower's new label head starts as its zero-shot classifier). Returns
    (new_head, compute and samples of the stages before)."""
    sd = clean_state_dict(src.get('ema') or src.get('model', src))  # a new stage takes the EMA weights if kept
    key = model.classifier_key()
    new_head = sd[key + '.weight'].shape != model.get_classifier().weight.shape
    model.load_weights(sd, skip_head=new_head)
    if new_head and zs_weights is not None:
        bias = sd.get(key + '.bias')
        proj = torch.nn.Linear(*sd[key + '.weight'].shape[::-1], bias=bias is not None)
        proj.load_state_dict({'weight': sd[key + '.weight'], **({'bias': bias} if bias is not None else {})})
        model.set_classifier(head_from_zeroshot(torch.nn.ModuleDict({'head': proj}), zs_weights.cpu(),
                                                feature_norm=zeroshot_feature_norm(model, proj, val_data, val_tf)))
        log("init_from: class head initialised from the CLIP zero-shot classifier")
    return new_head, src.get('compute_prev', 0.0) + src.get('compute', 0.0), \
        src.get('samples_prev', 0) + src.get('samples_seen', 0)


def start_weights(model, cfg, start, zs_weights, val_data, val_tf, log=print):
    """Load the stage's starting weights into model: its own checkpoint's (resume), another run's
    or file's, or an open_clip image tower's. Returns (samples seen, and compute and samples of
    the stages before)."""
    src = start.src
    if start.resuming:  # the trained weights (the EMA, if any, is restored by the caller)
        model.load_weights(src['model'])
        return src['samples_seen'], src['compute_prev'], src.get('samples_prev', 0)
    if src is not None:
        head_zs = zs_weights if cfg['data'] != 'webdataset' else None  # web -> labels: the zero-shot classifier
        new_head, compute_prev, samples_prev = start_new_stage(model, src, head_zs, val_data, val_tf, log)
        log(f"init_from {cfg['init_from']}: {'new head, ' if new_head else ''}{model.describe()}")
        return 0, compute_prev, samples_prev
    if start.from_open_clip:
        model.load_weights(load_open_clip_image_tower(cfg['init_from'], img_size=cfg['img_size']).state_dict())
        log(f"init_from {cfg['init_from']}: open_clip image tower, {model.describe()}")
    return 0, 0.0, 0


def fare_copy(cfg, start, model, device, dtype):
    """FARE's phi_orig: the stage's starting tower, frozen (a resumed run rebuilds it from init_from)."""
    if not start.resuming:
        return FareLoss(model, device, dtype)
    orig = build_model(start.model_args)
    if start.from_open_clip:
        orig.load_weights(load_open_clip_image_tower(cfg['init_from'], img_size=cfg['img_size']).state_dict())
    else:
        start_new_stage(orig, read_checkpoint(cfg['init_from']))
    return FareLoss(orig, device, dtype)


def make_ema(cfg, start, model_args, model, text_clip, device):
    """The EMA copies of the image tower and of a trained text tower (text_clip), restored when
    resuming; (None, None) without ema_decay."""
    if cfg['ema_decay'] <= 0:
        return None, None
    src = start.src if start.resuming else {}
    ema = build_model(model_args).to(device).requires_grad_(False)
    ema.load_state_dict(src.get('ema') or model.state_dict())
    ema_text = None
    if text_clip is not None:
        ema_text = copy.deepcopy(text_clip).requires_grad_(False)
        if src.get('text_ema') is not None:
            ema_text.load_state_dict(src['text_ema'])
    return ema, ema_text


def stage_losses(cfg, contrastive, tecoa_weights, fare):
    """(training loss, attack loss): the attack maximises the stage's own loss (Eq. 3 for web
    data; TeCoA's and FARE's as their papers do; soft-target cross-entropy for labels)."""
    if cfg['data'] == 'webdataset':
        return contrastive, attack_loss_fn(contrastive)
    if cfg['loss'] == 'tecoa':
        return (tecoa_loss_fn(tecoa_weights),) * 2
    if cfg['loss'] == 'fare':
        return fare, fare
    return soft_cross_entropy, soft_cross_entropy


def make_optimizer(cfg, model, extra_no_decay=(), text=None, fused=False):
    """AdamW (or SGD, TeCoA) with no weight decay on norms, biases, position embeddings and the
    class token, nor on extra_no_decay (the contrastive temperature); a trained text tower
    (joint CLIP) gets its own groups (clip_head.text_param_groups)."""
    decays = lambda n, p: p.ndim >= 2 and 'pos_embed' not in n and 'cls_token' not in n
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)] + list(extra_no_decay)
    groups = [{'params': decay, 'weight_decay': cfg['weight_decay']}, {'params': no_decay, 'weight_decay': 0.0}]
    groups += text_param_groups(text, cfg['weight_decay']) if text is not None else []
    if cfg['optimizer'] == 'adamw':
        return torch.optim.AdamW(groups, lr=cfg['lr'], betas=(cfg['beta1'], cfg['beta2']), fused=fused)
    return torch.optim.SGD(groups, lr=cfg['lr'], momentum=cfg['momentum'])
