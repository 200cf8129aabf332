"""
The CLIP side of AdvXL (Sec. 3.3): a frozen CLIPA text tower embeds web captions, the image
tower is trained with the contrastive loss (Eq. 2), and the attack maximises that loss with
the text embeddings fixed (Eq. 3). Also zero-shot ImageNet heads (to evaluate and fine-tune
such a tower) and a caption-embedding side file so training can skip the text tower.

    tower = load_text_tower('ViT-L-14-CLIPA', 'datacomp1b', device='cuda', precision='bf16')
    model = model.create_model('vit_large_patch16', embed_out=tower.embed_dim)
    loss_fn = ContrastiveLoss()                 # holds the learnable temperature
    txt = tower.encode(captions)                # (B, E), normalised, cached per string
    x_adv = attack.pgd(raw_model, x, txt, attack_loss_fn(loss_fn), eps, step, steps)
    loss = loss_fn(ddp_model(x_adv), txt)       # gathers the global batch under DDP
"""
import logging
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parent / 'assets'
# open_clip always builds a vision tower; we ask for this 1-layer 16px one and never load it
TINY_VISION = dict(image_size=16, patch_size=16, width=64, head_width=64, layers=1, mlp_ratio=1.0)


def _open_clip():
    import open_clip  # lazy: ~4 s to import, and only the web-data path needs it
    if not getattr(open_clip, '_nanoadvxl_configs', False):
        open_clip.add_model_config(ASSETS / 'open_clip')  # registers 'tiny-text'
        open_clip._nanoadvxl_configs = True
    return open_clip


# -------------------------------------------------------------------- text tower
class TextTower(nn.Module):
    """The frozen text half of an open_clip model plus its tokenizer. encode() returns
    L2-normalised float32 embeddings and remembers them per string (LRU, `cache_size`
    entries, on the tower's device), so class prompts and repeated captions run once."""

    def __init__(self, clip, tokenizer, name, pretrained, embed_dim, cache_size=65536):
        super().__init__()
        self.clip, self.tokenizer = clip, tokenizer
        self.name, self.pretrained, self.embed_dim = name, pretrained, embed_dim
        self.cache_size = cache_size
        self._cache = OrderedDict()
        self.hits = self.misses = 0
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: always eval

    @property
    def device(self):
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def encode(self, texts, batch_size=256, cache=True):
        texts = list(texts)
        got = {}
        for t in dict.fromkeys(texts):  # unique, in order
            if cache and t in self._cache:
                self._cache.move_to_end(t)
                got[t] = self._cache[t]
        todo = [t for t in dict.fromkeys(texts) if t not in got]
        self.hits += len(texts) - len(todo)
        self.misses += len(todo)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            tokens = self.tokenizer(chunk).to(self.device)
            feats = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            for t, f in zip(chunk, feats):
                got[t] = f.clone()  # own storage, so evicting frees it
                if cache and self.cache_size:
                    self._cache[t] = got[t]
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        return torch.stack([got[t] for t in texts])


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
                                   pretrained_text=False, pretrained_image=False)
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


# -------------------------------------------------------------------- contrastive loss
class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None


def gather_features(x):
    """All ranks' features, concatenated in rank order; only the local chunk carries a
    gradient (no collective in backward). Every rank computes the same global loss but
    back-propagates only through its own chunk, and DDP then *averages* over ranks: that
    would give the image tower 1/world of the single-process gradient while logit_scale
    (which sees the whole loss on every rank) gets all of it. Scaling the local chunk's
    gradient by world makes the DDP gradient equal the single-process one for every
    parameter (open_clip's gather_with_grad=False leaves the 1/world)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())  # needs equal batch sizes on all ranks
    parts[rank] = _ScaleGrad.apply(x, float(world))
    return torch.cat(parts)


def contrastive_loss(image_features, text_features, logit_scale):
    """Eq. 2: mean of image->text and text->image cross-entropy over the batch, on
    L2-normalised features; logit_scale = 1/tau (already exponentiated)."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale * img @ txt.T
    labels = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class ContrastiveLoss(nn.Module):
    """Eq. 2 with a learnable temperature, stored as log(1/tau) (init 1/0.07, CLIP/CLIPA) and
    clamped at log(100) where it is used, as CLIP does. gather=True: under DDP the loss is
    computed over the global batch (all ranks' features). Keep logit_scale out of weight
    decay (it is 0-dim, so a `p.ndim < 2` rule does that)."""

    def __init__(self, init_scale=1 / 0.07, max_scale=100.0, gather=True):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.max_log_scale = math.log(max_scale)
        self.gather = gather

    def scale(self):
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, image_features, text_features, gather=None):
        gather = self.gather if gather is None else gather
        with torch.autocast(image_features.device.type, enabled=False):  # logits in fp32
            img = F.normalize(image_features.float(), dim=-1)
            txt = F.normalize(text_features.float(), dim=-1)
            if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                img, txt = gather_features(img), gather_features(txt)
            return contrastive_loss(img, txt, self.scale())


def attack_loss_fn(loss_module):
    """Eq. 3's inner loss for attack.pgd(model, x, text_features, attack_loss_fn(loss), ...):
    the model output is the image features, y the batch's fixed text features. Local
    (gather=False): the attack runs per rank on the unwrapped model with no collectives,
    so its negatives are the local batch only."""
    return lambda out, txt: loss_module(out, txt, gather=False)


# -------------------------------------------------------------------- zero-shot
def _read_lines(name):
    return [l.rstrip('\n') for l in open(ASSETS / name, encoding='utf-8') if l.strip()]


def imagenet_classnames():
    """The CLIP list of 1000 ImageNet-1K class names, in class-index order (= sorted wnids)."""
    return _read_lines('imagenet_classnames.txt')


def imagenet_templates():
    """CLIP's 80 ImageNet prompt templates, each with one '{}' for the class name."""
    return _read_lines('clip_templates.txt')


@torch.no_grad()
def zeroshot_weights(tower, classnames=None, templates=None):
    """(C, E) class embeddings: the mean of the normalised prompt embeddings, re-normalised."""
    classnames = classnames or imagenet_classnames()
    templates = templates or imagenet_templates()
    texts = [t.replace('{}', c) for c in classnames for t in templates]
    emb = tower.encode(texts, cache=False).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


class ZeroShotClassifier(nn.Module):
    """[0,1] images -> class logits = scale * normalize(image_model(x)) @ weights.T, so an
    image tower trained contrastively is evaluated (clean, PGD-20, AutoAttack) like any
    classifier."""

    def __init__(self, image_model, weights, logit_scale=100.0):
        super().__init__()
        self.image_model = image_model
        self.register_buffer('weights', weights.detach().float().clone())
        self.logit_scale = float(logit_scale)

    def forward(self, x):
        feats = F.normalize(self.image_model(x).float(), dim=-1)
        return self.logit_scale * feats @ self.weights.T


@torch.no_grad()
def head_from_zeroshot(model, weights, scale=100.0, feature_norm=1.0):
    """nn.Linear(D, C) to replace model.head (the (E, D) projection) for fine-tuning on
    labels, initialised as the zero-shot classifier: weight = s * W_text @ W_proj,
    bias = s * W_text @ b_proj with s = scale / feature_norm. Its logits are
    s * W_text @ z with z the unnormalised image embedding, while the zero-shot logits
    are scale * W_text @ z / |z|: per image they differ by the positive factor
    |z| / feature_norm, so the argmax (and the clean accuracy) is the same. Pass
    feature_norm = mean |z| over a batch to also match the logit magnitudes.
    After `model.head = head`, set model.config.embed_out = 0 and num_classes = C."""
    proj = model.head
    W = weights.to(device=proj.weight.device, dtype=torch.float32)
    s = scale / float(feature_norm)
    head = nn.Linear(proj.in_features, W.shape[0], device=proj.weight.device, dtype=proj.weight.dtype)
    head.weight.copy_(s * W @ proj.weight.float())
    if proj.bias is not None:
        head.bias.copy_(s * W @ proj.bias.float())
    else:
        head.bias.zero_()
    return head


# -------------------------------------------------------------------- caption side file
@torch.no_grad()
def precompute_caption_embeddings(tower, shard_pattern, out_path, batch_size=1024):
    """Embed every caption of the shards once and save {'keys', 'embeddings' (N, E) fp16}
    to out_path; training then looks captions up by sample key (the stream yields keys;
    img2dataset keys are unique across shards) instead of running the text tower.
    When it pays: a caption costs one text forward (~2.7 G MACs for CLIPA-L, 32 tokens),
    a sample ~3 (steps+1) image forwards (3 x 2 x 15 G for ViT-L/16 at 112, PGD-1), so
    on-the-fly text is ~3-5% of a step (plus the tower's memory). Precomputing saves that
    on every pass after the first: worth it for multi-pass schedules (2.56B samples of
    LAION-400M = 6.4 passes), not for one pass. Size: 2E bytes a sample (0.6 TB for
    LAION-400M at E=768), and the key index lives in RAM: one file per shard range."""
    from data import expand_shards, iter_tar_samples
    keys, embs, pending = [], [], []

    def flush():
        if pending:
            embs.append(tower.encode([c for _, c in pending], batch_size=batch_size, cache=False).half().cpu())
            keys.extend(k for k, _ in pending)
            pending.clear()
    for url in expand_shards(shard_pattern):
        try:
            for _, s in iter_tar_samples(url, keep=('txt',)):
                if 'txt' in s:
                    pending.append((s['__key__'], s['txt'].decode('utf-8', errors='replace')))
                    if len(pending) >= batch_size:
                        flush()
        except Exception as e:  # truncated shard: keep what was read
            print(f"precompute: {url}: {type(e).__name__}: {e}")
    flush()
    emb = torch.cat(embs) if embs else torch.empty(0, tower.embed_dim, dtype=torch.float16)
    torch.save({'keys': keys, 'embeddings': emb, 'name': tower.name, 'pretrained': str(tower.pretrained)}, out_path)
    return len(keys)


class CaptionEmbeddings:
    """A precompute_caption_embeddings file: emb[keys] -> (B, E) float32, normalised."""

    def __init__(self, path):
        d = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        self.embeddings, self.name, self.pretrained = d['embeddings'], d['name'], d['pretrained']
        self.index = {k: i for i, k in enumerate(d['keys'])}

    def __len__(self):
        return len(self.index)

    def __getitem__(self, keys):
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise KeyError(f"{len(missing)} caption key(s) not in the side file, e.g. '{missing[0]}'")
        rows = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
        return F.normalize(self.embeddings[rows].float(), dim=-1)


load_caption_embeddings = CaptionEmbeddings
