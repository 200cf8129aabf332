"""
A run's model as a folder in the Hugging Face Hub layout of timm or open_clip, loadable by either
library with nothing of this project installed, and uploadable as it is:

    python export.py out/demo_ft --to timm --out exports/demo_ft
    python export.py out/demo_clip --to open_clip --out exports/demo_clip

    timm.create_model('local-dir:exports/demo_ft', pretrained=True)
    open_clip.create_model_and_transforms('local-dir:exports/demo_clip')

timm: config.json + model.safetensors, the image model. A labelled run keeps its classifier; a CLIP
tower keeps its projection as the head (num_classes = the embedding width, as timm's own CLIP towers),
so the model's output is the image embedding, and zeroshot_weights.safetensors beside it holds the
zero-shot classifier the run was evaluated with (for eval_autoattack.py).
open_clip: open_clip_config.json + open_clip_model.safetensors, both towers (CLIP runs only): the image
tower in open_clip's own layout (open_clip_interop.open_clip_vision), the run's text tower and temperature.

Both libraries normalise in their transforms, so the export moves our in-model mean/std into the
preprocessing config. The weights are the EMA where the run kept one (what its results measured), else
the model's. eval_autoattack.py --ckpt local-dir:DIR evaluates either folder (load_exported).
"""
import argparse
import json
import math
import os
import shutil
from dataclasses import asdict

import torch
import torch.nn as nn

import clip_head
import model as model_lib
import open_clip_interop
from checkpoint import read_checkpoint

ZEROSHOT_FILE = 'zeroshot_weights.safetensors'
# width and depth of timm's ViT sizes: the architecture name config.json gives (model_args say the rest)
_VIT_SIZES = {(192, 12): 'tiny', (384, 12): 'small', (768, 12): 'base', (1024, 24): 'large', (1280, 32): 'huge',
              (1408, 40): 'giant'}


# ----------------------------------------------------------------------------- the run
def run_model(ckpt):
    """The run's image model in eval mode: the EMA weights where kept (train.py evaluated and hands those on)."""
    net = model_lib.build_model({**ckpt['model_args'], 'grad_ckpt': False, 'drop_path_rate': 0.0})
    return net.load_weights(ckpt.get('ema') or ckpt['model']).eval()


def has_text_side(ckpt):
    return clip_head.is_clip_run(ckpt.get('config') or {}) or ckpt.get('text_model') is not None


def run_label_names(cfg, n):
    """The class names of a labelled run's val folder (sorted folder names: the label order), where known."""
    import data
    import demo_data
    val = cfg.get('val_data') or (f'{demo_data.DEMO_ROOT}/val' if cfg.get('data') == 'demo' else '')
    try:
        names = data.class_names(val) if val else None
    except OSError:  # the val folder is not on this machine
        names = None
    return names if names and len(names) == n else None


def logit_scale_of(ckpt):
    """log(1/temperature) for open_clip: a contrastive run's learned one, clamped at 100 as where it was
    used; else 100, the scale TeCoA's and FARE's zero-shot classifiers use."""
    if ckpt.get('contrastive'):
        return min(float(ckpt['contrastive']['logit_scale']), math.log(100))
    text = ckpt.get('text_model') or {}
    return float(text['logit_scale']) if 'logit_scale' in text else math.log(100)


# ----------------------------------------------------------------------------- timm's layout
def timm_layout(net):
    """(architecture, model_args, state dict) with which timm builds `net` and loads its weights. Module
    names are timm's already; timm's ViT ties the patch embedding's bias to the absence of a pre-norm and
    always has a head bias, so a bias it lacks moves into the position embedding (added to the same
    tokens) and one it has that we lack is zero."""
    import timm
    c = net.config
    sd = {k: v.detach().float().clone() for k, v in net.state_dict().items()}
    n_out = c.embed_out or c.num_classes
    if isinstance(net, model_lib.ConvNeXt):
        if c.norm_eps != 1e-6:
            raise ValueError(f"timm's ConvNeXt uses LayerNorm eps 1e-6, this one {c.norm_eps}")
        arch = model_lib.timm_convnext_name(c) or 'convnext_tiny'  # model_args give any other shape
        return arch, dict(depths=list(c.depths), dims=list(c.dims), patch_size=c.patch_size, in_chans=c.in_chans,
                          num_classes=n_out), sd
    # config.json cannot name a LayerNorm eps: timm's plain ViTs use 1e-6, its CLIP ViTs 1e-5
    if c.norm_eps not in (1e-6, 1e-5):
        raise ValueError(f"timm's ViTs use LayerNorm eps 1e-6 or (CLIP) 1e-5, this one {c.norm_eps}")
    clip_norm = '_clip' if c.norm_eps == 1e-5 else ''
    arch = f"vit_{_VIT_SIZES.get((c.embed_dim, c.depth), 'base')}_patch{c.patch_size}{clip_norm}_224"
    if not timm.is_model(arch):
        arch = f'vit_base_patch16{clip_norm}_224'
    if c.patch_bias and c.pre_norm:
        sd['pos_embed'][:, net.num_prefix:] += sd.pop('patch_embed.proj.bias')
    elif not c.patch_bias and not c.pre_norm:
        sd['patch_embed.proj.bias'] = torch.zeros(c.embed_dim)
    if not c.head_bias:
        sd['head.bias'] = torch.zeros(n_out)
    args = dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
                depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias,
                class_token=c.class_token, global_pool=c.global_pool, pre_norm=c.pre_norm, act_layer=c.act,
                num_classes=n_out)
    return arch, args, sd


def timm_export(ckpt):
    """{file name: content} of the timm folder."""
    import timm
    net, cfg = run_model(ckpt), ckpt.get('config') or {}
    arch, args, sd = timm_layout(net)
    c, vit = net.config, isinstance(net, model_lib.ViT)
    n_out = args['num_classes']
    pretrained_cfg = dict(input_size=[c.in_chans, c.img_size, c.img_size], fixed_input_size=vit,
                          interpolation=cfg.get('val_interpolation', 'bilinear'), crop_pct=cfg.get('val_crop_pct', 1.0),
                          crop_mode='center', mean=list(c.mean), std=list(c.std), num_classes=n_out,
                          first_conv='patch_embed.proj' if vit else 'stem.0', classifier='head' if vit else 'head.fc')
    config = dict(architecture=arch, num_classes=n_out, num_features=c.embed_dim if vit else c.dims[-1],
                  model_args=args, pretrained_cfg=pretrained_cfg)
    files = {'config.json': config, 'model.safetensors': sd}
    if c.embed_out:  # a CLIP tower: the classifier its run evaluated, for eval_autoattack
        weights = ckpt.get('zeroshot_weights')
        if weights is None:  # written before checkpoints held it
            import eval_autoattack
            weights = eval_autoattack.training_zeroshot_weights(cfg)
        files[ZEROSHOT_FILE] = {'weights': weights.float().contiguous()}
    elif run_label_names(cfg, n_out):
        config['label_names'] = run_label_names(cfg, n_out)  # timm's model card and predictions name the classes
    with torch.device('meta'):  # the folder must build in timm: check the layout before writing it
        check = timm.create_model(arch, pretrained=False, **args)
    open_clip_interop.check_export_fits(check, sd, f"timm's {arch}")
    return files


# ----------------------------------------------------------------------------- open_clip's layout
def open_clip_export(ckpt):
    """{file name: content} of the open_clip folder: our image tower and the run's text tower (the trained
    one stored as ckpt['text_model'], else the frozen one rebuilt from the run's config)."""
    net, cfg = run_model(ckpt), ckpt.get('config') or {}
    if not cfg.get('text_tower'):
        raise ValueError("the checkpoint's config names no text_tower")
    text_sd, quick = open_clip_interop.text_side(cfg['text_tower'], cfg.get('text_pretrained'),
                                                 cfg.get('text_seed', cfg.get('seed', 0)), ckpt.get('text_model'))
    c = net.config
    preprocess = dict(size=c.img_size, mode='RGB', mean=list(c.mean), std=list(c.std),
                      interpolation=cfg.get('val_interpolation', 'bilinear'), resize_mode='shortest', fill_color=0)
    config, sd = open_clip_interop.open_clip_export(net, cfg['text_tower'], text_sd, quick, logit_scale_of(ckpt),
                                                    preprocess)
    # the run's zero-shot prompts, so its classifier can be rebuilt from the folder (eval_autoattack does)
    config['prompt_templates'] = list(cfg.get('prompt_templates') or clip_head.imagenet_templates())
    return {'open_clip_config.json': config, 'open_clip_model.safetensors': sd,
            'tokenizer': lambda folder: open_clip_interop.save_tokenizer(cfg['text_tower'], folder)}


# ----------------------------------------------------------------------------- files
def write_folder(files, out):
    """Write {name: JSON-able dict, state dict, or a function that writes its own files into the folder}
    as the folder `out`, whole or not at all (a temporary folder renamed into place)."""
    from safetensors.torch import save_file
    tmp = out.rstrip(os.sep) + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, content in files.items():
        if callable(content):
            content(tmp)
        elif name.endswith('.json'):
            with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
                json.dump(content, f, indent=2)
        else:
            save_file(content, os.path.join(tmp, name), metadata={'format': 'pt'})
    if os.path.isdir(out):
        os.rmdir(out)  # empty (main refuses any other)
    os.replace(tmp, out)


def export(run, to, out):
    """Export the run (its out_dir or a checkpoint file) to the folder `out`; returns out. User mistakes
    are one-line SystemExits."""
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise SystemExit(f"error: --out {out} is not empty: name a new folder")
    ckpt = read_checkpoint(run)
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt:
        raise SystemExit(f"error: {run} is not a checkpoint train.py wrote (no model_args): pass a run's out_dir "
                         f"or one of its ckpt-*.pt files")
    if to == 'open_clip' and not has_text_side(ckpt):
        raise SystemExit(f"error: {run} is a labelled classifier with no text tower: --to open_clip needs a CLIP "
                         f"run (web data, TeCoA, FARE); export it with --to timm")
    try:
        files = open_clip_export(ckpt) if to == 'open_clip' else timm_export(ckpt)
    except ValueError as e:
        raise SystemExit(f"error: {run} cannot be exported --to {to}: {e}")
    try:
        write_folder(files, out)
    finally:
        shutil.rmtree(out.rstrip(os.sep) + '.tmp', ignore_errors=True)  # a failed write leaves nothing
    return out


# ----------------------------------------------------------------------------- reading an export back
class FromPixels(nn.Module):
    """An exported model taking this project's inputs, [0,1] images: the folder's mean/std applied here,
    where timm's and open_clip's transforms would apply them. open_clip: the image embedding."""

    def __init__(self, model, mean, std, clip=False):
        super().__init__()
        self.model, self.clip = model, clip
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        x = (x - self.mean) / self.std
        return self.model.encode_image(x) if self.clip else self.model(x)


def _folder(path):
    folder = path[len('local-dir:'):] if path.startswith('local-dir:') else path
    for name in ('open_clip_config.json', 'config.json'):
        if os.path.isfile(os.path.join(folder, name)):
            return folder, name
    raise SystemExit(f"error: {folder} holds neither open_clip_config.json nor config.json (an export.py folder)")


def load_exported(path, classnames=None, device='cpu'):
    """eval_autoattack's model for 'local-dir:DIR', loaded by the library the folder is for: an open_clip
    folder as the zero-shot classifier of its own text tower over `classnames` (default ImageNet's) with
    the run's prompts; a timm folder as its classifier, or, a CLIP tower, with the zero-shot classifier
    stored beside it. Eval mode, frozen, on `device`."""
    folder, kind = _folder(path)
    if kind == 'open_clip_config.json':
        clip, tokenizer, cfg = open_clip_interop.load_open_clip_export(folder)
        pp = clip.visual.preprocess_cfg
        tower = clip_head.TextTower(clip, tokenizer, path, None, cfg['model_cfg']['embed_dim'])
        weights = clip_head.zeroshot_weights(tower, classnames, cfg.get('prompt_templates'))
        m = clip_head.ZeroShotClassifier(FromPixels(clip, pp['mean'], pp['std'], clip=True), weights)
    else:
        import timm
        net = timm.create_model('local-dir:' + folder, pretrained=True)
        m = FromPixels(net, net.pretrained_cfg['mean'], net.pretrained_cfg['std'])
        if os.path.isfile(os.path.join(folder, ZEROSHOT_FILE)):
            from safetensors.torch import load_file
            m = clip_head.ZeroShotClassifier(m, load_file(os.path.join(folder, ZEROSHOT_FILE))['weights'])
    return m.to(device).eval().requires_grad_(False)


def exported_model_args(path):
    """Our model's arguments for the image model of an exported folder, read off its config (no weights):
    for eval_autoattack's image size, memory plan and dry run."""
    folder, kind = _folder(path)
    with open(os.path.join(folder, kind), encoding='utf-8') as f:
        cfg = json.load(f)
    if kind == 'open_clip_config.json':
        return open_clip_interop.open_clip_export_model_args(cfg)
    a, pc = cfg['model_args'], cfg['pretrained_cfg']
    n, embed = a['num_classes'], 0
    if os.path.isfile(os.path.join(folder, ZEROSHOT_FILE)):  # a CLIP tower: the head is its projection
        from safetensors import safe_open
        with safe_open(os.path.join(folder, ZEROSHOT_FILE), framework='pt') as f:
            n, embed = f.get_slice('weights').get_shape()[0], n
    common = dict(img_size=pc['input_size'][-1], in_chans=a.get('in_chans', 3), num_classes=n, embed_out=embed,
                  mean=tuple(pc['mean']), std=tuple(pc['std']))
    if cfg['architecture'].startswith('convnext'):
        return asdict(model_lib.ConvNeXtConfig(depths=tuple(a['depths']), dims=tuple(a['dims']),
                                               patch_size=a['patch_size'], **common))
    return asdict(model_lib.ViTConfig(
        patch_size=a['patch_size'], embed_dim=a['embed_dim'], depth=a['depth'], num_heads=a['num_heads'],
        mlp_ratio=a['mlp_ratio'], qkv_bias=a['qkv_bias'], class_token=a['class_token'], global_pool=a['global_pool'],
        norm_eps=1e-5 if '_clip_' in cfg['architecture'] else 1e-6, patch_bias=not a['pre_norm'],
        pre_norm=a['pre_norm'], act=a.get('act_layer') or 'gelu', **common))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('run', help="a run's out_dir (its newest checkpoint) or a ckpt-*.pt file")
    ap.add_argument('--to', required=True, choices=['timm', 'open_clip'])
    ap.add_argument('--out', required=True, help='the folder to write (new or empty)')
    args = ap.parse_args(argv)
    out = export(args.run, args.to, args.out)
    print(f"wrote {out}: load it with " + (f"timm.create_model('local-dir:{out}', pretrained=True)" if args.to == 'timm'
                                          else f"open_clip.create_model_and_transforms('local-dir:{out}')"))
    return out


if __name__ == '__main__':
    main()
