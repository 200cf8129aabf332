"""
Per-GPU memory plan of a training stage, printed by `train.py --dry_run=True`.

Weights, gradients, AdamW state, EMA and frozen towers are counted from their sizes.
Activations are measured, not guessed: the bytes autograd saves for backward (each storage
once, via torch.autograd.graph.saved_tensors_hooks) plus the block inputs that activation
checkpointing keeps, counted on small CPU copies of the stage's model (1 and 2 blocks per
stage, 1 and 2 images, under the stage's autocast dtype) and scaled linearly to the real
depth and micro batch; with checkpointing the one block being recomputed is added.
"""

import torch
from torch.autograd.graph import saved_tensors_hooks

import model as model_lib

GiB = 2 ** 30


def count_saved_bytes(fn, model=None):
    """Run fn(), forward only; return (bytes of the distinct storages autograd saved, fn's result,
    which cannot be back-propagated). With a model whose config has grad_ckpt, the inputs its
    checkpointed blocks keep are added."""
    storages, kept = {}, []

    def pack(t):
        # keep the storage (so its address is not reused while counting), not the tensor: a saved
        # tensor kept by its own graph is a reference cycle autograd never frees; no backward runs
        s = t.untyped_storage()
        storages[s.data_ptr() if t.device.type != 'meta' else id(t)] = s

    hooks = []
    if model is not None and model.config.grad_ckpt:
        def keep_input(module, args):
            if torch.is_grad_enabled():
                kept.append(args[0].numel() * args[0].element_size())
        hooks = [b.register_forward_pre_hook(keep_input) for b in checkpointed_blocks(model)]
    try:
        with saved_tensors_hooks(pack, lambda _: None):
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    return sum(s.nbytes() for s in storages.values()) + sum(kept), out


def checkpointed_blocks(model):
    if hasattr(model, 'blocks'):
        return list(model.blocks)
    return [b for stage in model.stages for b in stage.blocks]


def step_bytes(model, x, kind, mask_ratio=0.0, mask_kind='random', autocast=None):
    """Bytes saved by one attack step (eval mode, frozen weights, gradient w.r.t. the input
    only) or one training step (train mode, weight gradients)."""
    autocast = autocast or torch.autocast('cpu', enabled=False)
    training = kind == 'train'
    model.train(training)
    model.requires_grad_(training)
    x = x.clone().requires_grad_(not training)

    def forward():
        with autocast:
            return model(x, mask_ratio=mask_ratio, mask_kind=mask_kind).float().logsumexp(-1).mean()
    return count_saved_bytes(forward, model)[0]


def _depth_variants(args):
    """(args with one block per stage, [(args with one more block in stage i, blocks to scale by)])."""
    if 'dims' in args:  # ConvNeXt: a depth per stage
        n = len(args['depths'])
        base = {**args, 'depths': (1,) * n}
        return base, [({**args, 'depths': tuple(2 if j == i else 1 for j in range(n))}, args['depths'][i] - 1)
                      for i in range(n)]
    return {**args, 'depth': 1}, [({**args, 'depth': 2}, args['depth'] - 1)]


def activation_line(model_args, img_size, kind, mask_ratio=0.0, mask_kind='random', dtype='float32',
                    recompute=True):
    """(fixed, per image) activation bytes of one attack or training step: the peak at a micro
    batch b is fixed + per_image * b, measured on small copies and scaled (module docstring)."""
    autocast = torch.autocast('cpu', dtype=torch.bfloat16) if dtype == 'bfloat16' else None
    ckpt = model_args.get('grad_ckpt', False)

    def measure(args, grad_ckpt):
        with torch.device('meta'):  # values do not matter for the bytes saved: skip the initialisation
            m = model_lib.build_model({**args, 'grad_ckpt': grad_ckpt, 'drop_path_rate': 0.0})
        m = m.to_empty(device='cpu')
        one, two = [step_bytes(m, torch.rand(b, 3, img_size, img_size), kind, mask_ratio, mask_kind, autocast)
                    for b in (1, 2)]
        return torch.tensor([2 * one - two, two - one], dtype=torch.float64)  # (fixed, per image)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        base_args, variants = _depth_variants(model_args)
        base = measure(base_args, ckpt)
        total = base + sum((measure(a, ckpt) - base) * n for a, n in variants)
        if ckpt and recompute:  # backward recomputes one block at a time, with all of its activations
            base_full = measure(base_args, False)
            total += max((measure(a, False) - base_full for a, _ in variants), key=lambda t: tuple(t.tolist()[::-1]))
    return tuple(int(v) for v in total.tolist())


def activation_bytes(model_args, micro, img_size, kind, mask_ratio=0.0, mask_kind='random', dtype='float32',
                     recompute=True):
    """Peak activation bytes of one attack or training step at this micro batch."""
    fixed, per_image = activation_line(model_args, img_size, kind, mask_ratio, mask_kind, dtype, recompute)
    return fixed + per_image * micro


def tower_params(name):
    """Parameter count of an open_clip model's text side, built on the meta device (no weights)."""
    from open_clip_interop import _open_clip
    open_clip = _open_clip()  # with this project's tiny configs registered
    with torch.device('meta'):
        clip = open_clip.create_model(name, pretrained=None, device='meta')
    return sum(p.numel() for n, p in clip.named_parameters() if not n.startswith('visual.'))


def text_activation_bytes(name, micro, dtype='bfloat16'):
    """Activations a trained text tower saves for backward over a micro batch of captions: per
    layer and token, s * (34 h + 5 a s) bytes at 2-byte precision (Korthikanti et al. 2022, eq. 2,
    with s the context length, h the width, a the heads), doubled in fp32."""
    from open_clip_interop import _open_clip
    text = _open_clip().get_model_config(name)['text_cfg']
    s, h, layers = text.get('context_length', 77), text.get('width', 512), text.get('layers', 12)
    a = text.get('heads', h // 64)
    return (1 if dtype == 'bfloat16' else 2) * micro * layers * s * (34 * h + 5 * a * s)


def eval_activation_line(model_args, img_size, dtype='float32'):
    """(fixed, per image) bytes of one evaluation attack step (PGD-k's input gradient, no masking)
    at dtype: activation_bytes is linear in the batch, so two batch sizes give the line."""
    return activation_line(dict(model_args, img_size=img_size), img_size, 'attack', dtype=dtype)


def fitting_eval_batch(line, budget, largest):
    """The largest evaluation batch, 1 to `largest`, whose activations (fixed, per image) fit in
    `budget` bytes (1 when none does)."""
    fixed, per_image = line
    return int(max(1, min(largest, (budget - fixed) // max(per_image, 1))))


def final_eval_batch(eval_batch_size, micro, model_args, img_size, eval_dtype, device):
    """train.py's final evaluation batch per rank: eval_batch_size, else the micro batch, lowered on
    a GPU to what its free memory holds beside the training state (fp32 PGD needs more than bf16
    training)."""
    if eval_batch_size or torch.device(device).type != 'cuda':
        return eval_batch_size or micro
    torch.cuda.empty_cache()
    line = eval_activation_line(model_args, img_size, eval_dtype)
    return fitting_eval_batch(line, 0.9 * torch.cuda.mem_get_info(device)[0], micro)  # 10%: fragmentation


def memory_plan(model_args, micro, img_size, pgd_steps, mask_ratio=0.0, mask_kind='random', dtype='bfloat16',
                ema=False, text_tower=None, frozen_copy=False, eval_dtype='float32', budget=None, eval_batch=0,
                train_text=False):
    """{component: bytes} per GPU, 'peak' and 'eval_batch'. Weights, gradients, AdamW's two moments
    and the EMA are fp32, and so is FARE's frozen copy of the image tower (run under autocast); the
    CLIP text tower is bf16 under bf16 training. DDP's buckets are the gradients
    (gradient_as_bucket_view; zero_grad keeps them). The peak is the largest of the stage's phases,
    each on top of that state: a training step's attack and update (at dtype), the evaluations
    during training (at dtype, without masking), and the final evaluation (PGD at eval_dtype,
    without masking) at the largest batch up to `micro`
    that keeps the peak within `budget` bytes (micro when budget is None), or at eval_batch.
    train_text: the text tower trains too (joint CLIP): fp32 weights, gradients, AdamW state and
    EMA like the image tower's, and its activations, kept through the attack and the update."""
    with torch.device('meta'):
        n_params = sum(p.numel() for p in model_lib.build_model(model_args).parameters())
    frozen_bytes = 2 if dtype == 'bfloat16' else 4
    plan = {'parameters': 4 * n_params, 'gradients': 4 * n_params, 'adamw_state': 8 * n_params,
            'ema': 4 * n_params if ema else 0,
            'text_tower': ((20 if ema else 16) if train_text else frozen_bytes) * tower_params(text_tower)
            if text_tower else 0,
            'frozen_copy': 4 * n_params if frozen_copy else 0,
            'images': micro * 3 * img_size ** 2 * (1 + 4 * 3),  # uint8 batch; x, x_adv and its gradient in fp32
            # joint CLIP: the captions' embeddings are computed once, before the attack, and kept for the update
            'text_activations_kept': text_activation_bytes(text_tower, micro, dtype) if train_text else 0}
    args = dict(model_args, img_size=img_size)
    plan['attack_activations'] = activation_bytes(args, micro, img_size, 'attack', mask_ratio, mask_kind, dtype) \
        if pgd_steps > 0 else 0
    plan['train_activations'] = activation_bytes(args, micro, img_size, 'train', mask_ratio, mask_kind, dtype)
    # the evaluations during training attack whole images (no masking) at the micro batch, at dtype
    plan['interim_eval_activations'] = activation_bytes(args, micro, img_size, 'attack', dtype=dtype) \
        if mask_ratio > 0 else 0
    static = sum(v for k, v in plan.items() if not k.endswith('_activations'))
    line = eval_activation_line(model_args, img_size, eval_dtype)
    eval_batch = eval_batch or (micro if budget is None else fitting_eval_batch(line, budget - static, micro))
    plan['eval_activations'] = line[0] + line[1] * eval_batch
    plan['peak'] = static + max(v for k, v in plan.items() if k.endswith('_activations'))
    plan['eval_batch'] = eval_batch
    return plan


def format_plan(plan):
    return ' | '.join(f"{k} {v / GiB:.2f}" for k, v in plan.items() if v and k != 'eval_batch') + ' (GiB per GPU)'


# ----------------------------------------------------------------------------- evaluation (AutoAttack, PGD-k)
def eval_line(model_args, img_size, dtype='float32', image_copies=24):
    """(fixed, per image) bytes on one device while an attack evaluates a batch of b images
    (the peak is fixed + per_image * b): the frozen fp32 weights (no gradients, no optimizer
    state; bf16 is autocast), `image_copies` fp32 tensors the size of the batch (the attack's
    per-point state) and the activations of one input-gradient step."""
    with torch.device('meta'):
        n_params = sum(p.numel() for p in model_lib.build_model(dict(model_args, img_size=img_size)).parameters())
    fixed, per_image = eval_activation_line(model_args, img_size, dtype)
    return 4 * n_params + fixed, per_image + image_copies * 4 * 3 * img_size ** 2
