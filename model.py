"""
A self-contained Vision Transformer for adversarial training, tiny to giant.

- Inputs are images in [0,1]; mean/std normalisation happens inside the model, so
  attacks and their eps live in pixel space.
- Module names follow timm's VisionTransformer, so a timm (or official AdvXL) state dict
  loads with prefix stripping only, and `timm_state_dict()` exports that layout back.
- Variable resolution: the learned position embedding is resized (bicubic) to the input's
  patch grid; token reduction by random or block masking for the paper's Table 1a.
"""
import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: str = 'avg'       # 'avg': GAP over patch tokens + fc_norm (AdvXL); 'token': final norm + class token
    drop_path_rate: float = 0.0
    embed_out: int = 0             # > 0: project to a CLIP embedding of this width instead of a class head
    norm_eps: float = 1e-6
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    grad_ckpt: bool = False        # activation checkpointing per block (memory for ViT-H/g)


# timm's shapes; the demo presets use patch 4 so a 16-32 px image still has 16-64 tokens
PRESETS = {
    'vit_tiny_patch16':  dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'vit_small_patch16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'vit_base_patch16':  dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'vit_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    'vit_huge_patch14':  dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    'vit_giant_patch14': dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
    'vit_demo_patch4':   dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=2, num_classes=10),
    'vit_pico_patch4':   dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10),
}


def create_model(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(PRESETS)}")
    known = {f.name for f in fields(ViTConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown model option(s) {bad} for '{name}'; known: {sorted(known)}")
    return ViT(ViTConfig(**{**PRESETS[name], **overrides}))


def drop_path(x, p, training):
    # stochastic depth: drop the whole residual branch per sample, rescale the survivors
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, D


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU, as timm and the AdvXL checkpoints


class Block(nn.Module):
    def __init__(self, cfg, drop_path_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class ViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.global_pool not in ('avg', 'token') or (cfg.global_pool == 'token' and not cfg.class_token):
            raise ValueError(f"global_pool is 'avg', or 'token' with class_token=True; got {cfg.global_pool!r}")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of the patch size {cfg.patch_size}")
        self.config = cfg
        D = cfg.embed_dim
        self.register_buffer('mean', torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)
        self.patch_embed = PatchEmbed(cfg)
        grid = cfg.img_size // cfg.patch_size
        self.num_prefix = 1 if cfg.class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + grid * grid, D))
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # deeper blocks drop more
        self.blocks = nn.ModuleList([Block(cfg, p) for p in dpr])
        avg = cfg.global_pool == 'avg'
        self.norm = nn.Identity() if avg else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if avg else nn.Identity()
        self.head = nn.Linear(D, cfg.embed_out or cfg.num_classes)
        self._pos_cache = {}
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    # ---------------------------------------------------------------- position embedding
    def _resized_pos_embed(self, gh, gw):
        """Patch position embedding for a gh x gw grid (class-token slot kept apart).
        In eval mode or without grad (attacks, evaluation) the result is cached per grid,
        keyed on the parameter's version counter so an optimizer step invalidates it."""
        pos = self.pos_embed[:, self.num_prefix:]
        g = int(math.sqrt(pos.shape[1]))
        if (gh, gw) == (g, g):
            return pos
        cacheable = not self.training or not torch.is_grad_enabled()
        key = (gh, gw, self.pos_embed._version, pos.device, pos.dtype)
        if cacheable and key in self._pos_cache:
            return self._pos_cache[key]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not cacheable):
            out = resize_pos_grid(pos, (gh, gw))
        if cacheable:
            self._pos_cache = {key: out}  # one entry: a run evaluates at one size at a time
        return out

    # ---------------------------------------------------------------- forward
    def forward_features(self, x, mask_ratio=0.0, mask_kind='random'):
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        x = (x - self.mean) / self.std
        x = self.patch_embed(x) + self._resized_pos_embed(H // p, W // p)
        if mask_ratio > 0:
            x = mask_tokens(x, (H // p, W // p), mask_ratio, mask_kind)
        if self.cls_token is not None:
            cls = self.cls_token + self.pos_embed[:, :1]
            x = torch.cat([cls.expand(B, -1, -1), x], dim=1)
        for blk in self.blocks:
            if self.config.grad_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.norm(x)
        if self.config.global_pool == 'avg':
            return self.fc_norm(x[:, self.num_prefix:].mean(dim=1))
        return x[:, 0]

    def forward(self, x, mask_ratio=0.0, mask_kind='random'):
        return self.head(self.forward_features(x, mask_ratio, mask_kind))

    # ---------------------------------------------------------------- compute
    def flops(self, img_size=None, mask_ratio=0.0, mask_kind='random'):
        """Forward multiply-accumulates by the paper's convention (RECIPE.md): patch embedding,
        qkv/proj/MLP matmuls and the two attention matmuls; norms, GELU and the head ignored."""
        c = self.config
        img_size = img_size or c.img_size
        n_patches = (img_size // c.patch_size) ** 2
        n = num_kept_tokens(n_patches, mask_ratio, mask_kind) + self.num_prefix
        D, hidden = c.embed_dim, int(c.embed_dim * c.mlp_ratio)
        patch = n_patches * c.in_chans * c.patch_size ** 2 * D
        block = n * D * 3 * D + 2 * n * n * D + n * D * D + 2 * n * D * hidden
        return patch + c.depth * block

    # ---------------------------------------------------------------- timm interop
    def timm_state_dict(self):
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_timm_state_dict(self, sd, skip_head=False):
        """Load a timm-layout ViT state dict (timm's own, the official AdvXL checkpoints, or
        ours), optionally wrapped in 'state_dict'/'model' and prefixed 'module.'/'base_model.'.
        The position embedding is resized when the file was trained at another resolution.
        skip_head=True leaves this model's head as it is (a new task)."""
        sd = clean_state_dict(sd)
        own = self.state_dict()
        if skip_head:
            sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
            own = {k: v for k, v in own.items() if not k.startswith('head.')}
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"state dict does not fit {self.describe()}: missing keys {missing[:8]}"
                             f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                             f"{'...' if len(unexpected) > 8 else ''}")
        if sd['pos_embed'].shape != own['pos_embed'].shape:
            prefix, grid = sd['pos_embed'][:, :self.num_prefix], sd['pos_embed'][:, self.num_prefix:]
            g = int(math.sqrt(own['pos_embed'].shape[1] - self.num_prefix))
            sd['pos_embed'] = torch.cat([prefix, resize_pos_grid(grid, (g, g))], 1)
        bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
        if bad:
            raise ValueError(f"state dict does not fit {self.describe()}: shape mismatch {bad[:4]}")
        self.load_state_dict(sd, strict=not skip_head)
        self._pos_cache = {}
        return self

    def describe(self):
        c = self.config
        return f"ViT(patch {c.patch_size}, width {c.embed_dim}, depth {c.depth}, {c.img_size}px, head {c.embed_out or c.num_classes})"


def resize_pos_grid(pos, grid_hw):
    """(1, g*g, D) -> (1, gh*gw, D): bicubic, anti-aliased, in fp32, exactly as timm resamples."""
    g = int(math.sqrt(pos.shape[1]))
    D, dtype = pos.shape[-1], pos.dtype
    pos = pos.float().reshape(1, g, g, D).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=grid_hw, mode='bicubic', align_corners=False, antialias=True)
    return pos.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], D).to(dtype)


# -------------------------------------------------------------------- token reduction
def block_shape(grid_hw, n_keep):
    """The most square h x w block inside the grid whose area is closest to n_keep."""
    gh, gw = grid_hw
    return min(((h, w) for h in range(1, gh + 1) for w in range(1, gw + 1)),
               key=lambda hw: (abs(hw[0] * hw[1] - n_keep), abs(hw[0] - hw[1])))


def num_kept_tokens(n_patches, mask_ratio, kind='random'):
    if mask_ratio <= 0:
        return n_patches
    n_keep = max(1, round(n_patches * (1 - mask_ratio)))
    if kind == 'block':
        g = int(math.sqrt(n_patches))
        h, w = block_shape((g, g), n_keep)
        return h * w
    return n_keep


def mask_tokens(x, grid_hw, mask_ratio, kind='random'):
    """Keep a per-sample random subset of patch tokens (MAE-style) or one contiguous block of
    the patch grid of about the same size at a random place (paper Table 1a)."""
    B, N, D = x.shape
    gh, gw = grid_hw
    n_keep = max(1, round(N * (1 - mask_ratio)))
    if kind == 'random':
        idx = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :n_keep]
    elif kind == 'block':
        h, w = block_shape(grid_hw, n_keep)
        top = torch.randint(0, gh - h + 1, (B, 1, 1), device=x.device)
        left = torch.randint(0, gw - w + 1, (B, 1, 1), device=x.device)
        rows = top + torch.arange(h, device=x.device).view(1, h, 1)
        cols = left + torch.arange(w, device=x.device).view(1, 1, w)
        idx = (rows * gw + cols).reshape(B, h * w)
    else:
        raise ValueError(f"mask_kind must be 'random' or 'block', got '{kind}'")
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, D))


# -------------------------------------------------------------------- files
def clean_state_dict(sd):
    for wrapper in ('state_dict', 'model'):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    out = {}
    for k, v in sd.items():
        for prefix in ('module.', 'base_model.', '_orig_mod.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def config_from_timm_state_dict(sd, arch=None):
    """Architecture of a timm ViT state dict: the preset with the same patch, width and depth
    (heads cannot be read off the weights), or `arch` when given."""
    sd = clean_state_dict(sd)
    w = sd['patch_embed.proj.weight']
    D, C, p = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    if arch is None:
        matches = [n for n, a in PRESETS.items()
                   if (a['patch_size'], a['embed_dim'], a['depth']) == (p, D, depth)]
        if not matches:
            raise ValueError(f"no preset has patch {p}, width {D}, depth {depth}: pass arch=<preset> "
                             f"(one of {', '.join(PRESETS)}) with any overrides")
        arch = matches[0]
    class_token = 'cls_token' in sd
    n_pos = sd['pos_embed'].shape[1] - int(class_token)
    args = {**PRESETS[arch], 'patch_size': p, 'embed_dim': D, 'depth': depth, 'in_chans': C,
            'img_size': int(math.sqrt(n_pos)) * p, 'num_classes': sd['head.weight'].shape[0],
            'class_token': class_token, 'global_pool': 'avg' if 'fc_norm.weight' in sd else 'token',
            'qkv_bias': 'blocks.0.attn.qkv.bias' in sd}
    return ViTConfig(**args)


def model_from_file(path, arch=None, **overrides):
    """A model from this project's checkpoint (has 'model_args') or a timm / official AdvXL
    state dict (architecture from `arch` or matched to a preset). Not put in eval mode."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"checkpoint not found: {path} (pass the path to a .pt/.pth file or a run's out_dir)")
    except Exception as e:
        raise SystemExit(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]} "
                         f"(is it a torch state dict saved with torch.save?)")
    if isinstance(ckpt, dict) and 'model_args' in ckpt:
        cfg = ViTConfig(**{**ckpt['model_args'], **overrides})
    else:
        cfg = config_from_timm_state_dict(ckpt, arch)
        for k, v in overrides.items():
            setattr(cfg, k, v)
    return ViT(cfg).load_timm_state_dict(ckpt)
