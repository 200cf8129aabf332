"""
open_clip models in this project: the one file that talks to the open_clip library. Its text
towers (frozen, for the contrastive loss and zero-shot heads of clip_head.py), its ViT image
towers as our ViT and back (the layout map), model specs such as 'ViT-L-14/openai' (TeCoA and
FARE start from one), finding their weights and tokenizers offline or online, and our CLIP
towers in layouts open_clip builds itself (export.py's open_clip folders, and reading them back).

    tower = load_text_tower('ViT-L-14-CLIPA', 'datacomp1b', device='cuda', precision='bf16')
    vit = load_open_clip_image_tower('ViT-L-14/openai')   # our ViT, CLIP's mean/std inside
    vit = from_open_clip(oc_model)                        # from an open_clip model or state dict
    oc_model.visual.load_state_dict(open_clip_state_dict(vit))
"""
import json
import logging
import math
import os
import threading
from dataclasses import asdict

import torch
import torch.nn as nn

from clip_head import ASSETS, TextTower
from model import ViT, ViTConfig, clean_state_dict, create_model, timm_convnext_name

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's (and every open_clip ViT's) preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip always builds a vision tower; we ask for this 1-layer 16px one and never load it
TINY_VISION = dict(image_size=16, patch_size=16, width=64, head_width=64, layers=1, mlp_ratio=1.0)


def _open_clip():
    import open_clip  # lazy: ~4 s to import, and only the web-data path needs it
    if not getattr(open_clip, '_nanoadvxl_configs', False):
        open_clip.add_model_config(ASSETS / 'open_clip')  # registers 'tiny-text'
        open_clip._nanoadvxl_configs = True
    return open_clip


# -------------------------------------------------------------------- weights, tokenizers, text towers
def _online(host, timeout=3.0):
    """Can we open a TCP connection to host:443 within timeout? Run in a thread because
    DNS lookups ignore socket timeouts; without this a missing network costs ~30 s of
    retries inside huggingface_hub before open_clip gives up."""
    import socket
    ok = []

    def probe():
        try:
            ok.append(socket.create_connection((host, 443), timeout=timeout).close() is None)
        except OSError:
            pass
    th = threading.Thread(target=probe, daemon=True)
    th.start(), th.join(timeout)
    return bool(ok)


def _offline_env():
    return os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')


def _resolve_weights(oc, name, tag, cache_dir, allow_download=True):
    """A local file for (name, tag): the path itself, the Hugging Face / CLIP cache, or a
    download when there is network. Returns (path, problem); problem is a one-line string."""
    if tag is None or os.path.isfile(os.path.expanduser(tag)):
        return tag and os.path.expanduser(tag), None
    if os.sep in tag or tag.endswith(('.bin', '.pt', '.pth', '.safetensors')):
        return None, f"text tower weights file not found: {tag}"
    cfg = oc.get_pretrained_cfg(name, tag)
    hint = (f"open_clip weights '{name}' pretrained='{tag}' are not cached here{{}}; fetch them where there is "
            f"network and pass pretrained=/path/to/open_clip_pytorch_model.bin")
    if not cfg:
        return None, (f"open_clip has no pretrained tag '{tag}' for '{name}' (tags: "
                      f"{oc.list_pretrained_tags_by_model(name)}); or pass pretrained=/path/to/open_clip_pytorch_model.bin")
    if cfg.get('hf_hub'):
        from huggingface_hub import hf_hub_download
        repo, fname = os.path.split(cfg['hf_hub'])
        hint = hint.replace('fetch them', f"fetch them (`hf download {repo}`)")
        for f in ('open_clip_model.safetensors', fname or 'open_clip_pytorch_model.bin'):
            try:
                return hf_hub_download(repo, f, cache_dir=cache_dir, local_files_only=True), None
            except Exception:
                pass
        host = 'huggingface.co'
    else:
        url = cfg.get('url', '')
        cached = os.path.join(cache_dir or os.path.expanduser('~/.cache/clip'), os.path.basename(url))
        if os.path.isfile(cached):
            return cached, None
        hint, host = hint.replace('fetch them', f"fetch them ({url})"), url.split('/')[2]
    if not allow_download:
        return None, hint.format('')
    if _offline_env() or not _online(host):
        return None, hint.format(f" and cannot be downloaded (offline: HF_HUB_OFFLINE or no route to {host})")
    try:
        return oc.download_pretrained(cfg, cache_dir=cache_dir), None
    except Exception as e:
        return None, f"{hint.format('')}; download failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _load_text_state_dict(path):
    """The checkpoint minus the vision tower. safetensors reads only the text tensors;
    torch files are memory-mapped so the visual half is never paged in."""
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            return {k: f.get_tensor(k) for k in f.keys() if not k.startswith('visual.')}
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:  # old (non-zip) torch format cannot be mmapped
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    ckpt = ckpt['state_dict'] if isinstance(ckpt.get('state_dict'), dict) else ckpt
    sd = {k.removeprefix('module.'): v for k, v in ckpt.items()}
    return {k: v for k, v in sd.items() if not k.startswith('visual.')}


def _tokenizer(oc, name, text_cfg, tokenizer_path, offline):
    hf_name = text_cfg.get('hf_tokenizer_name')
    if not hf_name:
        return oc.get_tokenizer(name), None  # built-in BPE, ships with open_clip
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None, (f"'{name}' uses the Hugging Face tokenizer '{hf_name}', which needs `pip install transformers` "
                      f"and its files (cached, or a folder passed as tokenizer_path=)")
    import huggingface_hub.constants as hfc
    saved = hfc.HF_HUB_OFFLINE
    hfc.HF_HUB_OFFLINE = hfc.HF_HUB_OFFLINE or offline  # fail at once instead of retrying
    try:
        from open_clip.tokenizer import HFTokenizer
        return HFTokenizer(tokenizer_path or hf_name, context_length=text_cfg.get('context_length', 77),
                           tokenizer_mode=text_cfg.get('tokenizer_mode'), **text_cfg.get('tokenizer_kwargs', {})), None
    except Exception as e:
        return None, (f"cannot load the '{hf_name}' tokenizer for '{name}' ({type(e).__name__}); "
                      f"download it where there is network and pass tokenizer_path=/path/to/{hf_name}")
    finally:
        hfc.HF_HUB_OFFLINE = saved


def load_text_tower(name='ViT-L-14-CLIPA', pretrained='datacomp1b', device='cpu', precision='fp32',
                    seed=0, tokenizer_path=None, cache_dir=None, cache_size=65536):
    """Frozen open_clip text tower. `pretrained`: an open_clip tag, a local checkpoint file
    (open_clip_pytorch_model.bin / .safetensors), or None for a random init from `seed`
    (the tiny 'tiny-text' config in assets/open_clip is for tests and the demo).
    Fails with a one-line SystemExit naming every missing piece (weights, tokenizer)."""
    oc = _open_clip()
    model_cfg = oc.get_model_config(name)
    if model_cfg is None:
        raise SystemExit(f"unknown open_clip model '{name}' (e.g. ViT-L-14-CLIPA, ViT-H-14-CLIPA, tiny-text)")
    if 'vision_cfg' not in model_cfg or 'multimodal_cfg' in model_cfg:
        raise SystemExit(f"'{name}' is not a plain CLIP model; only CLIP / CustomTextCLIP text towers are supported")
    import importlib.util
    no_tf = bool(model_cfg['text_cfg'].get('hf_tokenizer_name')) and importlib.util.find_spec('transformers') is None
    path, problem = _resolve_weights(oc, name, pretrained, cache_dir, allow_download=not no_tf)  # don't fetch GBs to fail
    offline = _offline_env() or problem is not None  # weights already failed: don't wait on the tokenizer
    tokenizer, tok_problem = _tokenizer(oc, name, model_cfg['text_cfg'], tokenizer_path, offline)
    problems = [p for p in (problem, tok_problem) if p]
    if problems:
        raise SystemExit('; '.join(problems))

    # build with a throwaway vision tower: a ViT-bigG image tower would cost 7 GB per rank
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logging.disable(logging.WARNING)  # open_clip warns 'initialized randomly': we load the weights below
        try:
            clip = oc.create_model(name, pretrained=None, precision=precision, device='cpu', vision_cfg=TINY_VISION,
                                   pretrained_text=False, pretrained_image=False,
                                   force_quick_gelu=_tag_quick_gelu(oc, name, pretrained))
        finally:
            logging.disable(logging.NOTSET)
    del clip.visual  # encode_text never touches it (CLIP: transformer/token_embedding/...; CustomTextCLIP: .text)
    if path is not None:
        sd = _load_text_state_dict(path)
        from open_clip.model import convert_to_custom_text_state_dict, resize_text_pos_embed
        if 'positional_embedding' in sd and not hasattr(clip, 'positional_embedding'):
            sd = convert_to_custom_text_state_dict(sd)  # what open_clip's load_checkpoint does, minus visual
        resize_text_pos_embed(sd, clip)
        if 'logit_scale' in sd:
            sd['logit_scale'] = sd['logit_scale'].reshape(clip.logit_scale.shape)
        sd.pop('logit_bias', None)
        res = clip.load_state_dict(sd, strict=False)
        missing = [k for k in res.missing_keys if k != 'logit_bias']
        if missing or res.unexpected_keys:
            raise SystemExit(f"{path} does not fit the text tower of '{name}': missing {missing[:6]}, "
                             f"unexpected {res.unexpected_keys[:6]}")
    clip.to(device)
    return TextTower(clip, tokenizer, name, pretrained, model_cfg['embed_dim'], cache_size)


# -------------------------------------------------------------------- image towers: the layout map
# open_clip's VisionTransformer (OpenAI CLIP's layout) is our ViT with: a bias-free patch conv, the class
# and position embeddings followed by a LayerNorm (ln_pre) before the blocks, nn.MultiheadAttention's fused
# in_proj (q, k, v stacked like our qkv), QuickGELU for the OpenAI weights, the class token after ln_post,
# and a bias-free projection `x @ proj` as the head. Only this standard layout is supported.
_OPEN_CLIP_BLOCK = [('norm1', 'ln_1'), ('attn.qkv', 'attn.in_proj'), ('attn.proj', 'attn.out_proj'),
                    ('norm2', 'ln_2'), ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj')]


def _open_clip_keys(depth, pre_norm=True):
    """(our key, open_clip key) for every tensor of a CLIP image tower."""
    pairs = [('patch_embed.proj.weight', 'conv1.weight'), ('cls_token', 'class_embedding'),
             ('pos_embed', 'positional_embedding'), ('norm.weight', 'ln_post.weight'),
             ('norm.bias', 'ln_post.bias'), ('head.weight', 'proj')]
    if pre_norm:
        pairs += [('norm_pre.weight', 'ln_pre.weight'), ('norm_pre.bias', 'ln_pre.bias')]
    for i in range(depth):
        for ours, theirs in _OPEN_CLIP_BLOCK:
            # nn.MultiheadAttention names its fused projection in_proj_weight / in_proj_bias
            sep = '_' if theirs == 'attn.in_proj' else '.'
            pairs += [(f'blocks.{i}.{ours}.{w}', f'transformer.resblocks.{i}.{theirs}{sep}{w}') for w in ('weight', 'bias')]
    return pairs


def _to_open_clip(key, t):
    if key == 'cls_token':
        return t.reshape(-1)          # (1, 1, D) -> (D,)
    if key == 'pos_embed':
        return t[0]                   # (1, 1 + N, D) -> (1 + N, D)
    if key == 'head.weight':
        return t.t().contiguous()     # Linear (E, D) -> proj (D, E), used as x @ proj
    return t


def _from_open_clip(key, t):
    if key == 'cls_token':
        return t.reshape(1, 1, -1)
    if key == 'pos_embed':
        return t.unsqueeze(0)
    if key == 'head.weight':
        return t.t().contiguous()
    return t


def open_clip_visual_state_dict(m):
    """The image tower's state dict in open_clip's layout, from an open_clip CLIP model, its
    .visual, or a state dict (full, with 'visual.' keys, or the visual tower's own)."""
    if isinstance(m, nn.Module):
        visual = getattr(m, 'visual', m)
        if not hasattr(visual, 'conv1') or not hasattr(visual, 'transformer'):
            raise ValueError(f"{type(visual).__name__} is not open_clip's VisionTransformer (timm or ResNet towers "
                             f"are not supported)")
        return visual.state_dict()
    sd = clean_state_dict(m)
    if any(k.startswith('visual.') for k in sd):
        sd = {k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}
    return sd


def clip_vit_config(img_size, patch_size, width, depth, embed_dim, mlp_ratio=4.0, num_heads=None, act='gelu',
                    pre_norm=True, norm_eps=1e-5, in_chans=3, mean=CLIP_MEAN, std=CLIP_STD):
    """ViTConfig of a CLIP image tower in open_clip's layout; heads default to open_clip's
    width // 64 (its head_width)."""
    return ViTConfig(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=width, depth=depth,
                     num_heads=num_heads or max(1, width // 64), mlp_ratio=mlp_ratio, qkv_bias=True, class_token=True,
                     global_pool='token', embed_out=embed_dim, norm_eps=norm_eps, mean=tuple(mean), std=tuple(std),
                     patch_bias=False, pre_norm=pre_norm, act=act, head_bias=False)


def open_clip_config(sd, act='gelu', norm_eps=1e-5, num_heads=None, mean=CLIP_MEAN, std=CLIP_STD):
    """ViTConfig of an open_clip visual state dict, read off the weights (heads cannot be)."""
    if 'conv1.weight' not in sd or 'transformer.resblocks.0.attn.in_proj_weight' not in sd:
        raise ValueError("not an open_clip ViT image tower state dict (no conv1.weight / transformer.resblocks.0.attn.in_proj_weight)")
    if 'proj' not in sd:
        raise ValueError("open_clip image tower without a projection ('proj') is not supported")
    w = sd['conv1.weight']
    D, C, p = w.shape[0], w.shape[1], w.shape[2]
    if w.shape[2] != w.shape[3]:
        raise ValueError(f"non-square patches {tuple(w.shape[2:])} are not supported")
    depth = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith('transformer.resblocks.'))
    n = sd['positional_embedding'].shape[0] - 1
    g = int(math.sqrt(n))
    if g * g != n:
        raise ValueError(f"positional_embedding of {n} patches is not a square grid")
    hidden = sd['transformer.resblocks.0.mlp.c_fc.weight'].shape[0]
    mlp_ratio = hidden / D
    if int(D * mlp_ratio) != hidden:  # the Block rebuilds hidden = int(D * mlp_ratio): guard float rounding
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    return clip_vit_config(g * p, p, D, depth, sd['proj'].shape[1], mlp_ratio, num_heads, act,
                           'ln_pre.weight' in sd, norm_eps, C, mean, std)


def _open_clip_act(visual):
    fn = visual.transformer.resblocks[0].mlp.gelu
    if type(fn).__name__ == 'QuickGELU':
        return 'quick_gelu'
    if isinstance(fn, nn.GELU) and fn.approximate == 'none':
        return 'gelu'
    raise ValueError(f"unsupported open_clip MLP activation {fn!r} (exact GELU or QuickGELU only)")


def from_open_clip(m, img_size=None, quick_gelu=None, num_heads=None):
    """Our ViT from an open_clip CLIP model, its .visual (open_clip.transformer.VisionTransformer)
    or a state dict (full or visual). It outputs oc.encode_image((x - mean) / std) for [0,1]
    images x: CLIP's mean/std are inside, the head is the projection (embed_out = its width).
    From a module the activation, norm eps and heads are read off it; a bare state dict does
    not say its activation, so pass quick_gelu (True for OpenAI's weights and '-quickgelu'
    models). img_size: another resolution (the position embedding is resized, bicubic)."""
    mean, std, eps = CLIP_MEAN, CLIP_STD, 1e-5
    if isinstance(m, nn.Module):
        visual = getattr(m, 'visual', m)
        sd = open_clip_visual_state_dict(visual)
        act = _open_clip_act(visual)
        if quick_gelu is not None and quick_gelu != (act == 'quick_gelu'):
            raise ValueError(f"quick_gelu={quick_gelu} contradicts the model's activation ({act})")
        if getattr(visual, 'attn_pool', None) is not None or getattr(visual, 'pool_type', 'tok') != 'tok':
            raise ValueError("only class-token pooling is supported (no attentional pooler, no 'avg' pool_type)")
        eps = visual.ln_post.eps
        num_heads = num_heads or visual.transformer.resblocks[0].attn.num_heads
        mean = getattr(visual, 'image_mean', None) or mean
        std = getattr(visual, 'image_std', None) or std
    else:
        sd = open_clip_visual_state_dict(m)
        if quick_gelu is None:
            raise ValueError("a bare state dict does not say its activation: pass quick_gelu=True (OpenAI weights, "
                             "'-quickgelu' models) or quick_gelu=False")
        act = 'quick_gelu' if quick_gelu else 'gelu'
    cfg = open_clip_config(sd, act, eps, num_heads, mean, std)
    pairs = _open_clip_keys(cfg.depth, cfg.pre_norm)
    extra = sorted(set(sd) - {theirs for _, theirs in pairs})
    if extra:  # layer scale, attentional pooler, custom blocks ...: not this layout
        raise ValueError(f"unsupported open_clip image tower: unexpected keys {extra[:6]}{'...' if len(extra) > 6 else ''}")
    with torch.device('meta'):  # no random init of weights that are overwritten at once (seconds for ViT-L)
        vit = ViT(cfg)
    vit.load_state_dict({ours: _from_open_clip(ours, sd[theirs]).detach().float().clone() for ours, theirs in pairs},
                        assign=True)
    vit.mean, vit.std = torch.tensor(cfg.mean).view(1, -1, 1, 1), torch.tensor(cfg.std).view(1, -1, 1, 1)
    if any(t.is_meta for t in [*vit.parameters(), *vit.buffers()]):
        raise RuntimeError("from_open_clip left a tensor unset: a new ViT buffer needs setting here")
    if img_size and img_size != cfg.img_size:
        vit = ViT(ViTConfig(**{**asdict(cfg), 'img_size': img_size})).load_weights(vit.state_dict())
    return vit


def open_clip_state_dict(vit):
    """The ViT `vit` in open_clip's VisionTransformer layout (`oc.visual.load_state_dict(...)`
    loads it strictly): the inverse of from_open_clip. Needs the CLIP layout: class token,
    'token' pooling, no patch or head bias (the head is the projection)."""
    c = vit.config
    if not (c.class_token and c.global_pool == 'token' and c.qkv_bias and not c.patch_bias and not c.head_bias):
        raise ValueError(f"{vit.describe()} is not in open_clip's layout (needs class_token, global_pool='token', "
                         f"qkv_bias, patch_bias=False, head_bias=False; from_open_clip builds such a tower)")
    ours = vit.state_dict()
    return {theirs: _to_open_clip(k, ours[k]).detach().clone() for k, theirs in _open_clip_keys(c.depth, c.pre_norm)}


# -------------------------------------------------------------------- model specs (TeCoA and FARE start from one)
def _tag_quick_gelu(oc, name, tag):
    # OpenAI's weights were trained with QuickGELU; open_clip's plain names ('ViT-L-14') build exact GELU
    # and only its '-quickgelu' names or the tag's config say otherwise (a wrong activation loads silently)
    if not tag or os.path.isfile(os.path.expanduser(str(tag))):
        return False
    return bool((oc.get_pretrained_cfg(name, tag) or {}).get('quick_gelu'))


def parse_open_clip_spec(spec):
    """'name[/tag][:file[:file...]]' -> (name, tag or None, [files]), or None when `name` is not
    an open_clip model (e.g. a run's out_dir):
      'ViT-L-14/openai'                     pretrained tag (cache, else download when online)
      'ViT-B-32'                            random init (tests)
      'ViT-L-14-quickgelu:/w/open_clip_pytorch_model.bin'   a local open_clip file (offline)
      'ViT-L-14/openai:/w/fare_eps_2.pt'    the tag's weights, then each file on top; a file holds
                                            a full open_clip state dict or only the image tower's
                                            (FARE/TeCoA releases, open_clip_state_dict())
    OpenAI's weights need QuickGELU: a tag says so itself, a bare file needs a '-quickgelu' name."""
    if not isinstance(spec, str) or not spec or os.path.exists(spec):
        return None
    head, *files = spec.split(':')
    name, _, tag = head.partition('/')
    if _open_clip().get_model_config(name) is None:
        return None
    return name, tag or None, files



def is_open_clip_spec(spec):
    return parse_open_clip_spec(spec) is not None


def open_clip_text_source(spec):
    """(name, pretrained) of the spec's text tower for load_text_tower: the tag, else the first file."""
    name, tag, files = _parse_or_exit(spec)
    return name, tag or (files[0] if files else None)


def _parse_or_exit(spec):
    parsed = parse_open_clip_spec(spec)
    if parsed is None:
        raise SystemExit(f"'{spec}' is not an open_clip model spec 'name[/tag][:file]' (e.g. ViT-B-32/openai, "
                         f"ViT-L-14/openai, ViT-L-14-quickgelu:/path/open_clip_pytorch_model.bin; names: "
                         f"open_clip.list_models())")
    return parsed


def _local_hint(oc, name, tag, problem):
    # _resolve_weights words its alternative for the text tower; here it is the spec's ':file' form
    qg = name + '-quickgelu' if _tag_quick_gelu(oc, name, tag) and oc.get_model_config(name + '-quickgelu') else name
    return (problem.replace("pass pretrained=/path/to/open_clip_pytorch_model.bin",
                            f"pass '{qg}:/path/to/open_clip_pytorch_model.bin'")
            .replace("text tower weights file", "open_clip weights file"))


def _load_open_clip_file(oc, clip, path, name):
    """Load a full open_clip state dict, or an image tower's alone, into clip (strict)."""
    from open_clip.factory import load_state_dict
    try:
        sd = load_state_dict(path)  # safetensors, 'state_dict' wrappers, 'module.' prefixes, OpenAI's JIT files
        if 'conv1.weight' in sd:
            clip.visual.load_state_dict(sd)
        else:
            oc.load_checkpoint(clip, path)
    except Exception as e:
        raise SystemExit(f"{path} does not fit open_clip '{name}': {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:300]}")


def load_open_clip(spec, text=False, img_size=None, seed=0, device='cpu', cache_dir=None):
    """(image tower as our ViT, frozen TextTower or None) of an open_clip model spec (see
    parse_open_clip_spec). The ViT has CLIP's mean/std inside and the projection as its head
    (from_open_clip). text=True also returns the same model's text side (for zero-shot
    classifiers). Offline or missing weights: one-line SystemExit naming the download and the
    local-file form."""
    oc = _open_clip()
    name, tag, files = _parse_or_exit(spec)
    model_cfg = oc.get_model_config(name)
    problems = []
    path = None
    if tag:
        path, problem = _resolve_weights(oc, name, tag, cache_dir)
        if problem:
            problems.append(_local_hint(oc, name, tag, problem))
    problems += [f"open_clip weights file not found: {f}" for f in files if not os.path.isfile(os.path.expanduser(f))]
    tokenizer = None
    if text:
        tokenizer, tok_problem = _tokenizer(oc, name, model_cfg['text_cfg'], None, _offline_env() or bool(problems))
        problems += [tok_problem] if tok_problem else []
    if problems:
        raise SystemExit('; '.join(problems))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logging.disable(logging.WARNING)  # 'initialized randomly': the weights are loaded below
        try:
            clip = oc.create_model(name, pretrained=None, device='cpu', force_quick_gelu=_tag_quick_gelu(oc, name, tag),
                                   pretrained_text=False, pretrained_image=False)
        finally:
            logging.disable(logging.NOTSET)
    for f in ([path] if path else []) + [os.path.expanduser(f) for f in files]:
        _load_open_clip_file(oc, clip, f, name)
    try:
        vit = from_open_clip(clip, img_size=img_size)
    except ValueError as e:
        raise SystemExit(f"open_clip '{name}': {e}")
    tower = None
    if text:
        del clip.visual  # encode_text never touches it
        tower = TextTower(clip.to(device), tokenizer, name, tag or (files[0] if files else None), model_cfg['embed_dim'])
    return vit.to(device), tower


def load_open_clip_image_tower(spec, img_size=None, seed=0, device='cpu', cache_dir=None):
    """Our ViT holding an open_clip model's image tower, e.g. init_from='ViT-L-14/openai'."""
    return load_open_clip(spec, img_size=img_size, seed=seed, device=device, cache_dir=cache_dir)[0]


def open_clip_tower_config(spec, img_size=None):
    """The ViTConfig load_open_clip_image_tower(spec) returns, from open_clip's model config alone
    (no weights read): for dry runs and compute estimates."""
    oc = _open_clip()
    name, tag, _ = _parse_or_exit(spec)
    cfg = oc.get_model_config(name)
    v = cfg['vision_cfg']
    unsupported = [k for k in ('timm_model_name', 'attentional_pool', 'ls_init_value', 'block_type')
                   if v.get(k)] + [k for k in ('pool_type',) if v.get(k, 'tok') != 'tok']
    if unsupported or isinstance(v['layers'], (list, tuple)) or isinstance(v.get('image_size', 224), (list, tuple)):
        raise SystemExit(f"open_clip '{name}': unsupported image tower ({', '.join(unsupported) or 'not a plain ViT'})")
    quick = bool(cfg.get('quick_gelu')) or _tag_quick_gelu(oc, name, tag)
    return clip_vit_config(img_size or v['image_size'], v['patch_size'], v['width'], v['layers'],
                           cfg['embed_dim'], v.get('mlp_ratio', 4.0), v['width'] // v.get('head_width', 64),
                           'quick_gelu' if quick else 'gelu', not v.get('no_ln_pre', False))



# -------------------------------------------------------------------- export: our towers in open_clip's own layouts
# export.py writes these as a Hugging Face Hub folder that open_clip.create_model('local-dir:DIR') loads with
# nothing of this project installed, so every tower must be one open_clip builds from its config alone.
def _fold_head_bias(g, beta, W, b):
    """LayerNorm (g, beta) then Linear (W, b) as a LayerNorm then a bias-free projection, the same
    function: the normalised vector n sums to zero, so adding c (1/g)^T to W adds c * sum(n) = 0, except
    to the new LayerNorm bias g / D, where it adds c; c = W beta + b - W g / D gives
    W'(g n + g / D) = W(g n + beta) + b. In float64, then rounded once. Returns (bias, projection weight)."""
    if (g == 0).any():
        raise ValueError("the final LayerNorm has a zero weight: its head bias cannot move into open_clip's projection")
    g, beta, W, b = (t.detach().double() for t in (g, beta, W, b))
    c = W @ beta + b - W @ g / len(g)
    return (g / len(g)).float(), (W + torch.outer(c, 1 / g)).float()


def _vit_vision(vit):
    """open_clip's VisionTransformer for any of our ViTs. What it lacks is folded in exactly: the patch
    embedding's bias into the patch tokens' position embedding (they are always added together), the
    head's bias into ln_post and the projection (_fold_head_bias)."""
    c = vit.config
    if not c.class_token:
        raise ValueError("a ViT without a class token has no open_clip layout (open_clip's tower always has one)")
    sd = {k: v.detach().float() for k, v in vit.state_dict().items()}
    pos = sd['pos_embed'][0].clone()
    if c.patch_bias:
        pos[1:] += sd['patch_embed.proj.bias']
    D = c.embed_dim
    out = {'conv1.weight': sd['patch_embed.proj.weight'], 'class_embedding': sd['cls_token'].reshape(-1),
           'positional_embedding': pos}
    if c.pre_norm:
        out.update({'ln_pre.weight': sd['norm_pre.weight'], 'ln_pre.bias': sd['norm_pre.bias']})
    for i in range(c.depth):
        for ours, theirs in _OPEN_CLIP_BLOCK:
            sep = '_' if theirs == 'attn.in_proj' else '.'
            for w in ('weight', 'bias'):
                t = sd.get(f'blocks.{i}.{ours}.{w}')
                if t is None:  # qkv_bias=False: open_clip's attention always has one, zero gives ours
                    t = torch.zeros(3 * D)
                out[f'transformer.resblocks.{i}.{theirs}{sep}{w}'] = t
    final = 'fc_norm' if c.global_pool == 'avg' else 'norm'  # open_clip's ln_post, after or before the pool
    g, beta, W = sd[f'{final}.weight'], sd[f'{final}.bias'], sd['head.weight']
    if c.head_bias and sd['head.bias'].any():
        beta, W = _fold_head_bias(g, beta, W, sd['head.bias'])
    out.update({'ln_post.weight': g, 'ln_post.bias': beta, 'proj': W.t()})
    cfg = dict(image_size=c.img_size, patch_size=c.patch_size, width=D, layers=c.depth, head_width=D // c.num_heads,
               mlp_ratio=c.mlp_ratio, no_ln_pre=not c.pre_norm, pool_type='avg' if c.global_pool == 'avg' else 'tok',
               final_ln_after_pool=c.global_pool == 'avg', norm_kwargs={'eps': c.norm_eps})
    return cfg, out, c.act


def _convnext_vision(net):
    """open_clip's timm tower, which builds its trunk by timm's registered name alone: timm's ConvNeXt
    sizes only, the head's linear layer as the tower's biased projection."""
    name = timm_convnext_name(net.config)
    if name is None:
        raise ValueError(f"{net.describe()} is not one of timm's registered ConvNeXt sizes (tiny, small, base, "
                         f"large), the only ConvNeXts open_clip builds")
    sd = {('head.proj.' + k[len('head.fc.'):] if k.startswith('head.fc.') else 'trunk.' + k): v.detach().float()
          for k, v in net.state_dict().items()}
    cfg = dict(timm_model_name=name, timm_model_pretrained=False, timm_pool='avg', timm_proj='linear',
               timm_proj_bias=True, image_size=net.config.img_size)
    return cfg, sd, None  # timm towers ignore open_clip's quick_gelu


def open_clip_vision(net):
    """(vision_cfg, state dict of `visual`, activation or None) of our CLIP image tower in a layout open_clip
    builds from its config alone, so that its encode_image of normalised images equals net([0,1] images).
    ValueError where no layout fits."""
    if not net.config.embed_out:
        raise ValueError(f"{net.describe()} is a classifier, not a CLIP image tower (no embedding projection)")
    return _convnext_vision(net) if hasattr(net.config, 'dims') else _vit_vision(net)


def text_side(name, pretrained, seed=0, state_dict=None):
    """(state dict, quick_gelu) of the text tower of open_clip model `name`: `state_dict` as given (a
    run that trained its text tower), else load_text_tower's, in fp32 (a random one from `seed`, as the
    run built it)."""
    oc = _open_clip()
    if oc.get_model_config(name) is None:
        raise SystemExit(f"unknown open_clip model '{name}' (the run's text_tower)")
    quick = bool(oc.get_model_config(name).get('quick_gelu')) or _tag_quick_gelu(oc, name, pretrained)
    if state_dict is None:
        state_dict = load_text_tower(name, pretrained or None, 'cpu', 'fp32', seed=seed).clip.state_dict()
    return {k.removeprefix('module.'): v.detach().float() for k, v in state_dict.items()}, quick


def save_tokenizer(name, folder):
    """Write the Hugging Face tokenizer of open_clip model `name` (CLIPA's, for one) into `folder`: open_clip's
    get_tokenizer('local-dir:DIR') reads it from the folder itself. Towers with open_clip's own BPE need none."""
    oc = _open_clip()
    text_cfg = oc.get_model_config(name)['text_cfg']
    if not text_cfg.get('hf_tokenizer_name'):
        return
    tokenizer, problem = _tokenizer(oc, name, text_cfg, None, _offline_env())
    if problem:
        raise SystemExit(problem)
    tokenizer.save_pretrained(folder)


def check_export_fits(model, sd, what):
    """Load an exported state dict into a (meta) model of the library it targets, strictly: a
    missing, extra or misshapen key stops the export in one line before anything is written."""
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the export does not fit {what}: {' '.join(str(e).split())[:300]}")


def open_clip_export(net, text_name, text_state_dict, quick_gelu, logit_scale, preprocess_cfg):
    """(open_clip_config.json's content without extras, the model's full state dict) of a CLIP model whose
    image tower is our `net` and whose text tower is open_clip model `text_name`'s, with log(1/temperature)
    `logit_scale`. Checked by building that model (on the meta device) and loading the state dict strictly."""
    oc = _open_clip()
    vision_cfg, visual, act = open_clip_vision(net)
    model_cfg = oc.get_model_config(text_name)
    if model_cfg['embed_dim'] != net.config.embed_out:
        raise ValueError(f"the image tower's embedding ({net.config.embed_out}) is not the text tower's "
                         f"({model_cfg['embed_dim']}, '{text_name}')")
    if act is not None and (act == 'quick_gelu') != quick_gelu:
        raise ValueError(f"open_clip uses one activation for both towers: the image tower's is {act}, "
                         f"'{text_name}' uses {'QuickGELU' if quick_gelu else 'GELU'}")
    model_cfg = {**model_cfg, 'vision_cfg': vision_cfg, 'quick_gelu': quick_gelu}
    sd = {'visual.' + k: v for k, v in visual.items()}
    sd.update((k, v) for k, v in text_state_dict.items() if not k.startswith('visual.'))
    shape = text_state_dict['logit_scale'].shape if 'logit_scale' in text_state_dict else \
        (1,) if model_cfg.get('nonscalar_logit_scale') else ()
    sd['logit_scale'] = torch.full(shape, float(logit_scale))
    sd = {k: v.contiguous().clone() for k, v in sd.items()}  # safetensors: no views, no shared storage
    logging.disable(logging.WARNING)  # 'initialized randomly': only the layout is built here
    try:
        with torch.device('meta'):
            clip = oc.create_model(text_name, pretrained=None, device='meta', pretrained_text=False,
                                   pretrained_image=False, vision_cfg=vision_cfg, quick_gelu=quick_gelu)
    finally:
        logging.disable(logging.NOTSET)
    check_export_fits(clip, sd, "open_clip's model")
    return {'model_cfg': model_cfg, 'preprocess_cfg': dict(preprocess_cfg)}, sd


def load_open_clip_export(folder, device='cpu'):
    """(open_clip model in eval mode, its tokenizer, its open_clip_config.json) of an exported folder,
    through open_clip's own 'local-dir:' loader (what a user of the folder runs)."""
    oc = _open_clip()
    spec = 'local-dir:' + folder
    logging.disable(logging.WARNING)
    try:
        clip = oc.create_model(spec, device=device)
    finally:
        logging.disable(logging.NOTSET)
    with open(os.path.join(folder, 'open_clip_config.json'), encoding='utf-8') as f:
        cfg = json.load(f)
    return clip.eval(), oc.get_tokenizer(spec), cfg


def open_clip_export_model_args(cfg):
    """Our model's arguments (asdict of its config) for an exported open_clip_config.json's image tower,
    read off the config alone: for eval_autoattack's memory plan and dry run."""
    m, pp = cfg['model_cfg'], cfg['preprocess_cfg']
    v = m['vision_cfg']
    mean, std = tuple(pp['mean']), tuple(pp['std'])
    if v.get('timm_model_name'):
        with torch.device('meta'):
            net = create_model(v['timm_model_name'], img_size=v['image_size'], embed_out=m['embed_dim'], mean=mean,
                               std=std)
        return asdict(net.config)
    return asdict(ViTConfig(img_size=v['image_size'], patch_size=v['patch_size'], embed_dim=v['width'],
                            depth=v['layers'], num_heads=v['width'] // v.get('head_width', 64),
                            mlp_ratio=v.get('mlp_ratio', 4.0),
                            global_pool='avg' if v.get('pool_type') == 'avg' else 'token', embed_out=m['embed_dim'], norm_eps=(v.get('norm_kwargs') or {}).get('eps', 1e-5),
                            mean=mean, std=std, patch_bias=False, pre_norm=not v.get('no_ln_pre', False),
                            act='quick_gelu' if m.get('quick_gelu') else 'gelu', head_bias=False))
