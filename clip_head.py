"""
The CLIP side of AdvXL (Sec. 3.3): a frozen CLIPA text tower embeds web captions, the image
tower is trained with the contrastive loss (Eq. 2), and the attack maximises that loss with
the text embeddings fixed (Eq. 3). Also zero-shot ImageNet heads (to evaluate and fine-tune
such a tower), a caption-embedding side file so training can skip the text tower, and the
TeCoA and FARE losses. open_clip_interop.py loads the towers.

    tower = open_clip_interop.load_text_tower('ViT-L-14-CLIPA', 'datacomp1b', device='cuda', precision='bf16')
    model = model.create_model('vit_large_patch16', embed_out=tower.embed_dim)
    loss_fn = ContrastiveLoss()                 # holds the learnable temperature
    txt = tower.encode(captions)                # (B, E), normalised, cached per string
    x_adv = attack.pgd(raw_model, x, txt, attack_loss_fn(loss_fn), eps, step, steps)
    loss = loss_fn(ddp_model(x_adv), txt)       # gathers the global batch under DDP
"""
import copy
from contextlib import nullcontext
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parent / 'assets'


# -------------------------------------------------------------------- text tower
class TextTower(nn.Module):
    """The frozen text half of an open_clip model plus its tokenizer. encode() returns
    L2-normalised float32 embeddings and remembers them per string in one (cache_size, E)
    table on the tower's device (LRU), so class prompts and repeated captions run once and a
    batch's lookups are one gather, not a kernel per caption."""

    def __init__(self, clip, tokenizer, name, pretrained, embed_dim, cache_size=65536):
        super().__init__()
        self.clip, self.tokenizer = clip, tokenizer
        self.name, self.pretrained, self.embed_dim = name, pretrained, embed_dim
        self.cache_size = cache_size
        self._rows = OrderedDict()  # text -> row of _table, least recently used first
        self._table = None
        self.hits = self.misses = 0
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: always eval

    @property
    def device(self):
        return next(self.clip.parameters()).device

    def _to_device(self, t):
        # pinned host memory + non_blocking: the copy does not stall the host (no sync)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == 'cuda' else t.to(self.device)

    @torch.no_grad()
    def _embed(self, texts, batch_size):
        # always batch_size rows (padded with ''): a text's embedding then does not depend on which
        # texts share its batch (GEMMs of other shapes round differently), so a resumed run, whose
        # cache refills in other batches, trains on the same bits
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            tokens = self._to_device(self.tokenizer(chunk + [''] * (batch_size - len(chunk))))
            out.append(F.normalize(self.clip.encode_text(tokens).float(), dim=-1)[:len(chunk)])
        return torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)

    @torch.no_grad()
    def encode(self, texts, batch_size=256, cache=True):
        texts = list(texts)
        unique = list(dict.fromkeys(texts))
        if not cache or not self.cache_size or len(unique) > self.cache_size:
            self.misses += len(unique) if cache else 0  # more distinct texts than rows: all run, none stay
            feats = self._embed(unique, batch_size)
            pos = {t: i for i, t in enumerate(unique)}
            return feats[self._to_device(torch.tensor([pos[t] for t in texts], dtype=torch.long))]
        for t in unique:
            if t in self._rows:
                self._rows.move_to_end(t)
        todo = [t for t in unique if t not in self._rows]
        self.hits += len(texts) - len(todo)
        self.misses += len(todo)
        if todo:
            if self._table is None:
                self._table = torch.zeros(self.cache_size, self.embed_dim, device=self.device)
            free = iter(range(len(self._rows), self.cache_size))
            rows = []
            for t in todo:  # a free row, else the least recently used one (never one of this batch's)
                r = next(free, None)
                if r is None:
                    r = self._rows.popitem(last=False)[1]
                self._rows[t] = r
                rows.append(r)
            self._table.index_copy_(0, self._to_device(torch.tensor(rows, dtype=torch.long)), self._embed(todo, batch_size))
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        return self._table[self._to_device(torch.tensor([self._rows[t] for t in texts], dtype=torch.long))]


class TextEncoder(nn.Module):
    """The trained text half of a joint CLIP run: tokens -> (unnormalised) caption embeddings.
    It shares its weights with `tower` (a TextTower), so a zero-shot classifier the tower builds
    sees the current weights. CLIP's own logit_scale stays frozen: ContrastiveLoss holds the
    temperature that trains."""

    def __init__(self, tower):
        super().__init__()
        self.clip, self.tokenizer = tower.clip, tower.tokenizer
        self.clip.requires_grad_(True)
        if isinstance(getattr(self.clip, 'logit_scale', None), nn.Parameter):
            self.clip.logit_scale.requires_grad_(False)

    def tokenize(self, texts):
        return self.tokenizer(list(texts))

    def forward(self, tokens):
        return self.clip.encode_text(tokens)


def caption_targets(tower, text_model=None, side_file='', batch_size=None, device='cpu'):
    """batch -> what the loss compares a web batch's images with: tokens for a trained text tower
    (the step encodes them), a side file's embeddings (looked up by sample key), or the frozen
    tower's embeddings (fixed shapes: the same bits after a resume)."""
    if text_model is not None:
        return lambda b: text_model.tokenize(b.text).to(device, non_blocking=True)
    if side_file:
        emb, pin = CaptionEmbeddings(side_file), torch.device(device).type == 'cuda'
        return lambda b: (emb[b.key].pin_memory() if pin else emb[b.key]).to(device, non_blocking=True)
    return lambda b: tower.encode(b.text, batch_size=batch_size)


def text_param_groups(text, weight_decay):
    """Weight decay on the text tower's matrices only: none on norms, biases and embeddings
    (token and position), as CLIP trains it."""
    params = [(n, p) for n, p in text.named_parameters() if p.requires_grad]
    decays = lambda n, p: p.ndim >= 2 and 'embedding' not in n
    return [{'params': [p for n, p in params if decays(n, p)], 'weight_decay': weight_decay},
            {'params': [p for n, p in params if not decays(n, p)], 'weight_decay': 0.0}]


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


def autocast_for(device_type, dtype=None):
    """torch.autocast to dtype; None: autocast off (an fp32 region inside a caller's autocast). A
    device type without autocast (meta, in the host-sync tests) runs as it is."""
    if not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


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
        with autocast_for(image_features.device.type):  # logits in fp32
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


def trained_zeroshot_weights(tower, ema_text, classnames, templates):
    """A joint CLIP run's zero-shot classifier from its text tower as it is now (its EMA, if kept)."""
    text = tower if ema_text is None else TextTower(ema_text, tower.tokenizer, tower.name, tower.pretrained,
                                                    tower.embed_dim, cache_size=0)
    return zeroshot_weights(text, classnames, templates)


def predicted_labels(out, emb=None):
    """What the training accuracy counts: the nearest row of emb (the batch's caption embeddings:
    in-batch retrieval; the zero-shot class embeddings: a CLIP tower fine-tuned on labels), else
    the logits' argmax."""
    if emb is None:
        return out.argmax(1)
    return (F.normalize(out.float(), dim=-1) @ emb.float().T).argmax(1)  # emb is bf16 under autocast


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
        with autocast_for(x.device.type):  # bf16 logits tie classes and zero DLR's gaps
            return self.logit_scale * feats @ self.weights.T


def retrieval_recall_at_1(image_model, tower, images, captions, eps=0.0, steps=20, step_size=1 / 255,
                          batch_size=100):
    """Text -> image retrieval recall@1 (percent) over (image, caption) pairs: a caption counts as
    retrieved when the image it ranks first carries that same caption (captions can repeat).
    eps > 0: each image first gets an L_inf PGD attack (steps, step_size, random start) that
    pushes it away from its own caption among all the distinct captions (cross-entropy over the
    caption gallery at logit scale 100)."""
    from attack import pgd
    row = {c: i for i, c in enumerate(dict.fromkeys(captions))}  # each distinct caption's row in the gallery
    gallery, own = list(row), torch.tensor([row[c] for c in captions])
    text = tower.encode(gallery, cache=False)  # (G, E), normalised
    classify = ZeroShotClassifier(image_model, text).to(text.device).eval()
    feats = []
    for x, y in zip(images.split(batch_size), own.split(batch_size)):
        x, y = x.to(text.device), y.to(text.device)
        if eps > 0:
            x = pgd(classify, x, y, lambda out, t: F.cross_entropy(out, t), eps, step_size, steps)
        with torch.no_grad():
            feats.append(F.normalize(image_model(x).float(), dim=-1))
    first = (text[own.to(text.device)] @ torch.cat(feats).T).argmax(1).cpu()  # each caption's top image
    return 100.0 * (own[first] == own).float().mean().item()


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
    from webdata import expand_shards, iter_tar_samples
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


# -------------------------------------------------------------------- runs that train a CLIP image tower
def is_clip_run(cfg):
    """Whether a run's config (a checkpoint's 'config') trained a CLIP image tower, evaluated as a
    zero-shot classifier: contrastive on web data, or fine-tuned with TeCoA or FARE."""
    return cfg.get('data') == 'webdataset' or cfg.get('loss') in ('tecoa', 'fare')


# -------------------------------------------------------------------- TeCoA and FARE losses
# Each is both the training loss and the attack's: attack.pgd(model, x, target, loss_fn, ...) calls
# loss_fn(model(x_adv), target), and the update uses loss_fn(model(x_adv), target) again (as for AdvXL).
def tecoa_loss(image_emb, targets, text_weights, logit_scale=100.0):
    """TeCoA (Mao et al., ICLR 2023): cross-entropy of the zero-shot logits
    logit_scale * cos(image embedding, class-prompt embedding). text_weights: (C, E) class
    prompts' embeddings (zeroshot_weights). targets: labels (B,) or soft targets (B, C).
    logit_scale 100: the official code uses CLIP's own logit_scale, clamped at ln(100) (its
    finetuning.py), which OpenAI's weights hold at exactly 100; FARE's TeCoA runs fix 100
    (RobustVLM train/adversarial_training_clip.py, ComputeLossWrapper logit_scale=100.)."""
    with autocast_for(image_emb.device.type):  # logits in fp32
        img = F.normalize(image_emb.float(), dim=-1)
        txt = F.normalize(text_weights.float(), dim=-1)
        return F.cross_entropy(logit_scale * img @ txt.T, targets)


def tecoa_loss_fn(text_weights, logit_scale=100.0):
    """loss_fn(image_emb, targets) for training and for attack.pgd, with the class weights fixed."""
    return lambda out, targets: tecoa_loss(out, targets, text_weights, logit_scale)


class FareLoss(nn.Module):
    """FARE (Schlarmann et al., ICML 2024): ||phi(x_adv) - phi_orig(x)||_2^2 against a frozen copy
    phi_orig of the starting image tower, on unnormalised embeddings, summed over the embedding
    and averaged over the batch (RobustVLM train/adversarial_training_clip.py: l2() and
    --output_normalize False), for both the attack and the update.

        fare = FareLoss(tower)                      # copy the tower *before* training changes it
        target = fare.targets(x)                    # phi_orig(x_clean), once per batch, no grad
        x_adv = pgd(model, x, target, fare, eps, step, 10)
        loss = fare(model(x_adv), target)

    The copy is frozen (no grad, always eval) and lives here, not in the model, so the
    optimizer never sees it. It keeps fp32 weights and runs under the training's autocast
    (dtype: torch.bfloat16 or float32): a copy cast to bf16 would round its normalisation
    buffers, norms and position embedding, so phi_orig(x) != phi(x) before any update."""

    def __init__(self, tower, device=None, dtype=torch.float32):
        super().__init__()
        tower = getattr(tower, '_orig_mod', tower)  # a torch.compile'd model: copy the module itself
        device = torch.device(device or next(tower.parameters()).device)
        self.dtype = dtype
        self.orig = copy.deepcopy(tower).requires_grad_(False).to(device).eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: always eval (no drop path)

    @torch.no_grad()
    def targets(self, x):
        with autocast_for(x.device.type, torch.bfloat16 if self.dtype == torch.bfloat16 else None):
            return self.orig(x).float()

    def forward(self, image_emb, targets):
        with autocast_for(image_emb.device.type):
            return (image_emb.float() - targets.float()).pow(2).sum(-1).mean()
