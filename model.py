"""
A self-contained Vision Transformer for adversarial training, tiny to giant.

- Inputs are images in [0,1]; mean/std normalisation happens inside the model, so
  attacks and their eps live in pixel space.
- Module names follow timm's VisionTransformer, so a timm (or official AdvXL) state dict
  loads with prefix stripping only, and `timm_state_dict()` exports that layout back.
- Variable resolution: the learned position embedding is resized (bicubic) to the input's
  patch grid; token reduction by random or block masking for the paper's Table 1a.
- ConvNeXt (the paper's Table 3 baseline) with the same interface and timm's `convnext_*`
  layout; a convolutional net takes any resolution natively and has no tokens to mask.
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
    # CLIP image towers (open_clip / OpenAI layout, see open_clip_interop.py); the defaults are timm's ViT
    patch_bias: bool = True        # CLIP's patch embedding conv has no bias
    pre_norm: bool = False         # LayerNorm on the tokens before the blocks (CLIP's ln_pre, timm's norm_pre)
    act: str = 'gelu'              # MLP activation: 'gelu' (exact) or 'quick_gelu' (x * sigmoid(1.702 x), OpenAI CLIP)
    head_bias: bool = True         # CLIP's projection (the head) has no bias


@dataclass
class ConvNeXtConfig:
    img_size: int = 224
    patch_size: int = 4            # stem conv kernel = stride (timm's name); 4 in every timm convnext_*
    in_chans: int = 3
    num_classes: int = 1000
    depths: tuple = (3, 3, 9, 3)   # blocks per stage; each stage after the first halves the resolution
    dims: tuple = (96, 192, 384, 768)
    drop_path_rate: float = 0.0
    ls_init_value: float = 1e-6    # layer scale (gamma) init
    embed_out: int = 0             # > 0: project to a CLIP embedding of this width instead of a class head
    norm_eps: float = 1e-6
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    grad_ckpt: bool = False        # activation checkpointing per block

    def __post_init__(self):
        self.depths, self.dims = tuple(self.depths), tuple(self.dims)  # a config read back may hold lists
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths {self.depths} and dims {self.dims} must have one entry per stage")


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
    # ConvNeXt presets start with 'convnext' (that is how create_model picks the class) and always name dims
    'convnext_tiny':     dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    'convnext_small':    dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    'convnext_base':     dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    'convnext_large':    dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    # stem stride 1 (not 4): at 32 px the deep third stage sees 8x8, as the demo ViT's tokens do (at 224
    # ConvNeXt's third stage and ViT-B/16 both see 14x14); the demo's 16 px stage keeps a 2x2 last stage
    'convnext_demo':     dict(img_size=32, patch_size=1, depths=(1, 1, 3, 1), dims=(32, 64, 128, 256), num_classes=10),
}


def is_convnext(name):
    return name.startswith('convnext')


def create_model(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(PRESETS)}")
    known = {f.name for f in fields(ConvNeXtConfig if is_convnext(name) else ViTConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown model option(s) {bad} for '{name}'; known: {sorted(known)}")
    return build_model({**PRESETS[name], **overrides})


def build_model(args):
    """A model from a stored asdict(config): a ConvNeXt if it has 'dims', else a ViT."""
    return ConvNeXt(ConvNeXtConfig(**args)) if 'dims' in args else ViT(ViTConfig(**args))


def drop_path(x, p, training):
    # stochastic depth: drop the whole residual branch per sample, rescale the survivors
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)

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


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's approximation; its weights were trained with it


ACTIVATIONS = {'gelu': F.gelu, 'quick_gelu': quick_gelu}


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act='gelu'):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # exact GELU by default, as timm and the AdvXL checkpoints


class Block(nn.Module):
    def __init__(self, cfg, drop_path_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.act)
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
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # deeper blocks drop more
        self.blocks = nn.ModuleList([Block(cfg, p) for p in dpr])
        avg = cfg.global_pool == 'avg'
        self.norm = nn.Identity() if avg else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if avg else nn.Identity()
        self.head = nn.Linear(D, cfg.embed_out or cfg.num_classes, bias=cfg.head_bias)
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
        x = self.norm_pre(x)
        for blk in self.blocks:
            # every forward that builds a graph, the attack's (eval mode) as much as training's
            x = checkpoint(blk, x, use_reentrant=False) if self.config.grad_ckpt and torch.is_grad_enabled() else blk(x)
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

    # ---------------------------------------------------------------- classifier (the final nn.Linear)
    def classifier_key(self):
        return 'head'

    def get_classifier(self):
        return self.head

    def set_classifier(self, linear):
        self.head = linear

    # ---------------------------------------------------------------- timm interop
    def timm_state_dict(self):
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_weights(self, sd, skip_head=False):
        """Load a timm-layout ViT state dict (timm's own, the official AdvXL checkpoints, or
        ours), optionally wrapped in 'state_dict'/'model' and prefixed 'module.'/'base_model.'.
        The position embedding is resized when the file was trained at another resolution.
        skip_head=True leaves this model's head as it is (a new task)."""
        sd, own = state_dicts_to_match(self, sd, skip_head)
        require_same_keys(sd, own, self.describe())
        if sd['pos_embed'].shape != own['pos_embed'].shape:
            prefix, grid = sd['pos_embed'][:, :self.num_prefix], sd['pos_embed'][:, self.num_prefix:]
            g = int(math.sqrt(own['pos_embed'].shape[1] - self.num_prefix))
            sd['pos_embed'] = torch.cat([prefix, resize_pos_grid(grid, (g, g))], 1)
        require_same_shapes(sd, own, self.describe())
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


# -------------------------------------------------------------------- ConvNeXt
# timm's convnext_* layout: stem (patch_size x patch_size conv of that stride, 4x4/4 in timm; LN) ->
# stages of blocks, each stage after the first opening with a downsample (LN, 2x2/2 conv) ->
# global average pool -> head.norm -> head.fc.
class LayerNorm2d(nn.LayerNorm):
    # LayerNorm over the channels of an NCHW map (timm's LayerNorm2d: same parameters)
    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, cfg, dim, drop_path_rate):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), cfg.ls_init_value))  # layer scale
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        # the depthwise 7x7 mixes space; norm, MLP and layer scale act per position, channels last
        y = self.gamma * self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1)))
        return x + drop_path(y.permute(0, 3, 1, 2), self.drop_path_rate, self.training)


def refuse_masking(mask_ratio):
    if mask_ratio > 0:
        raise ValueError("masking is a ViT token operation; use img_size (resizing) to reduce ConvNeXt's compute")


class ConvNeXt(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.register_buffer('mean', torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)
        p, dims = cfg.patch_size, cfg.dims
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_chans, dims[0], p, p), LayerNorm2d(dims[0], eps=cfg.norm_eps))
        n = sum(cfg.depths)
        dpr = iter([cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)])  # deeper blocks drop more
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(cfg.depths, dims)):
            down = nn.Identity() if i == 0 else nn.Sequential(LayerNorm2d(dims[i - 1], eps=cfg.norm_eps),
                                                              nn.Conv2d(dims[i - 1], dim, 2, 2))
            blocks = nn.Sequential(*[ConvNeXtBlock(cfg, dim, next(dpr)) for _ in range(depth)])
            self.stages.append(nn.ModuleDict(dict(downsample=down, blocks=blocks)))
        self.head = nn.ModuleDict(dict(norm=nn.LayerNorm(dims[-1], eps=cfg.norm_eps),
                                       fc=nn.Linear(dims[-1], cfg.embed_out or cfg.num_classes)))
        self.init_weights()

    def init_weights(self):
        # timm's: truncated normal for every conv and linear (its head_init_scale defaults to 1: no rescale)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- forward
    def forward_features(self, x, mask_ratio=0.0, mask_kind='random'):
        """Pooled, head-normed features. Any size works; a side that is not a multiple of the
        total stride (32 with the 4x4 stem) loses its last rows/columns at the strided convs, as in timm."""
        refuse_masking(mask_ratio)
        stride = self.config.patch_size * 2 ** (len(self.stages) - 1)
        if min(x.shape[-2:]) < stride:
            raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is smaller than ConvNeXt's total stride {stride}")
        x = self.stem((x - self.mean) / self.std)
        for stage in self.stages:
            x = stage.downsample(x)
            for blk in stage.blocks:
                x = checkpoint(blk, x, use_reentrant=False) if self.config.grad_ckpt and torch.is_grad_enabled() else blk(x)
        return self.head.norm(x.mean(dim=(2, 3)))  # pool first, then norm (the original ConvNeXt order)

    def forward(self, x, mask_ratio=0.0, mask_kind='random'):
        return self.head.fc(self.forward_features(x, mask_ratio, mask_kind))

    # ---------------------------------------------------------------- compute
    def flops(self, img_size=None, mask_ratio=0.0, mask_kind='random'):
        """Forward multiply-accumulates by ViT.flops' convention: stem, depthwise 7x7, the two MLP
        linears and the downsampling convs; norms, GELU, layer scale and the head ignored."""
        refuse_masking(mask_ratio)
        c = self.config
        h = (img_size or c.img_size) // c.patch_size
        macs = h * h * c.in_chans * c.patch_size ** 2 * c.dims[0]
        for i, (depth, D) in enumerate(zip(c.depths, c.dims)):
            if i > 0:
                h //= 2
                macs += h * h * c.dims[i - 1] * 4 * D
            macs += depth * h * h * (49 * D + 2 * D * 4 * D)
        return macs

    # ---------------------------------------------------------------- classifier (the final nn.Linear)
    def classifier_key(self):
        return 'head.fc'

    def get_classifier(self):
        return self.head.fc

    def set_classifier(self, linear):
        self.head.fc = linear

    # ---------------------------------------------------------------- timm interop
    def timm_state_dict(self):
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_weights(self, sd, skip_head=False):
        """Load a timm convnext_* state dict (or ours), wrapped and prefixed as ViT's loader
        accepts. skip_head=True leaves head.fc as it is (a new task); head.norm is loaded."""
        sd, own = state_dicts_to_match(self, sd, skip_head)
        require_same_keys(sd, own, self.describe())
        require_same_shapes(sd, own, self.describe())
        self.load_state_dict(sd, strict=not skip_head)
        return self

    def describe(self):
        c = self.config
        return (f"ConvNeXt(depths {'-'.join(map(str, c.depths))}, widths {'-'.join(map(str, c.dims))}, "
                f"stem {c.patch_size}, {c.img_size}px, head {c.embed_out or c.num_classes})")


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


def state_dicts_to_match(model, sd, skip_head):
    """The cleaned file and the model's own state dict, both without the classifier under skip_head."""
    sd, own = clean_state_dict(sd), model.state_dict()
    if skip_head:
        head = model.classifier_key() + '.'
        sd = {k: v for k, v in sd.items() if not k.startswith(head)}
        own = {k: v for k, v in own.items() if not k.startswith(head)}
    return sd, own


def require_same_keys(sd, own, what):
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit {what}: missing keys {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")


def require_same_shapes(sd, own, what):
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"state dict does not fit {what}: shape mismatch {bad[:4]}")


def timm_convnext_name(cfg):
    """timm's registered name of a ConvNeXt of this shape (our presets tiny to large carry timm's names and
    shapes), or None: open_clip builds a timm tower by its name alone."""
    for name in ('convnext_tiny', 'convnext_small', 'convnext_base', 'convnext_large'):
        p = PRESETS[name]
        if (p['depths'], p['dims'], 4, 1e-6) == (tuple(cfg.depths), tuple(cfg.dims), cfg.patch_size, cfg.norm_eps):
            return name
    return None


def config_from_timm_state_dict(sd, arch=None):
    """Architecture of a timm ViT state dict: the preset with the same patch, width and depth
    (heads cannot be read off the weights), or `arch` when given. A timm ConvNeXt state dict
    (it has 'stem.0.weight') gives a ConvNeXtConfig read off the weights, at the resolution of
    `arch` or 224."""
    sd = clean_state_dict(sd)
    if arch is not None and (arch not in PRESETS or is_convnext(arch) != ('stem.0.weight' in sd)):
        kind = 'ConvNeXt' if 'stem.0.weight' in sd else 'ViT'
        raise ValueError(f"arch '{arch}' is not a {kind} preset, as this state dict needs; choose one of: "
                         f"{', '.join(n for n in PRESETS if is_convnext(n) == (kind == 'ConvNeXt'))}")
    if 'stem.0.weight' in sd:
        w = sd['stem.0.weight']
        n_stages = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('stages.'))
        depths = tuple(1 + max(int(k.split('.')[3]) for k in sd if k.startswith(f'stages.{i}.blocks.'))
                       for i in range(n_stages))
        dims = (w.shape[0],) + tuple(sd[f'stages.{i}.downsample.1.weight'].shape[0] for i in range(1, n_stages))
        return ConvNeXtConfig(**{**(PRESETS[arch] if arch else {}), 'depths': depths, 'dims': dims,
                                 'patch_size': w.shape[2], 'in_chans': w.shape[1],
                                 'num_classes': sd['head.fc.weight'].shape[0]})
    w = sd['patch_embed.proj.weight']
    D, C, p = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    if arch is None:
        matches = [n for n, a in PRESETS.items() if not is_convnext(n)
                   and (a['patch_size'], a['embed_dim'], a['depth']) == (p, D, depth)]
        if not matches:
            raise ValueError(f"no preset has patch {p}, width {D}, depth {depth}: pass arch=<preset> "
                             f"(one of {', '.join(n for n in PRESETS if not is_convnext(n))}) with any overrides")
        arch = matches[0]
    class_token = 'cls_token' in sd
    n_pos = sd['pos_embed'].shape[1] - int(class_token)
    args = {**PRESETS[arch], 'patch_size': p, 'embed_dim': D, 'depth': depth, 'in_chans': C,
            'img_size': int(math.sqrt(n_pos)) * p, 'num_classes': sd['head.weight'].shape[0],
            'class_token': class_token, 'global_pool': 'avg' if 'fc_norm.weight' in sd else 'token',
            'qkv_bias': 'blocks.0.attn.qkv.bias' in sd, 'patch_bias': 'patch_embed.proj.bias' in sd,
            'pre_norm': 'norm_pre.weight' in sd, 'head_bias': 'head.bias' in sd}
    return ViTConfig(**args)  # the activation cannot be read off the weights: exact GELU, as timm's default


def model_from_file(path, arch=None, **overrides):
    """A ViT or ConvNeXt from this project's checkpoint (a file, or a run's out_dir; its EMA weights
    where the run kept them) or a timm / official AdvXL state dict (architecture from `arch` or read
    off the weights). Not put in eval mode."""
    from checkpoint import read_checkpoint
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and 'model_args' in ckpt:
        args = ckpt['model_args']
        ckpt = ckpt.get('ema') or ckpt['model']  # the weights the run evaluated and hands on: its EMA, if kept
    else:
        args = asdict(config_from_timm_state_dict(ckpt, arch))
    return build_model({**args, **overrides}).load_weights(ckpt)


# -------------------------------------------------------------------- open_clip image towers
def from_open_clip(m, img_size=None, quick_gelu=None, num_heads=None):
    """Our ViT from an open_clip model or state dict: open_clip_interop.from_open_clip, where all
    of the open_clip layout lives (imported when called: it builds on this file's ViT)."""
    import open_clip_interop
    return open_clip_interop.from_open_clip(m, img_size, quick_gelu, num_heads)
