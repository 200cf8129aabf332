"""The memory plan of a dry run against direct counts of the bytes autograd saves, and
activation checkpointing in the attack (its forward runs in eval mode)."""
from dataclasses import asdict

import pytest
import torch

import memplan
import model as M

BF16 = torch.autocast('cpu', dtype=torch.bfloat16)


def direct(args, micro, size, kind, autocast=None):
    m = M.build_model(args)
    return memplan.step_bytes(m, torch.rand(micro, 3, size, size), kind, autocast=autocast)


@pytest.mark.parametrize('name,size,kw', [('vit_small_patch16', 112, dict(depth=4)),
                                          ('convnext_demo', 32, {})])
def test_attack_with_grad_ckpt_saves_at_most_half(name, size, kw):
    saved = {ck: direct(asdict(M.create_model(name, img_size=size, grad_ckpt=ck, **kw).config), 8, size, 'attack')
             for ck in (False, True)}
    assert saved[True] <= 0.5 * saved[False], saved
    # and the attack leaves the model's mode and weights as they were
    m = M.create_model(name, img_size=size, grad_ckpt=True, **kw).train()
    memplan.step_bytes(m, torch.rand(2, 3, size, size), 'attack')
    assert not m.training


@pytest.mark.parametrize('grad_ckpt', [False, True])
@pytest.mark.parametrize('kind', ['attack', 'train'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_plan_matches_a_direct_count(grad_ckpt, kind, dtype):
    """Measured on 1-2 blocks and 1-2 images, scaled to depth 6 and micro batch 12: within 10%
    of counting the full model at the full batch."""
    args = asdict(M.create_model('vit_small_patch16', depth=6, img_size=64, grad_ckpt=grad_ckpt).config)
    plan = memplan.activation_bytes(args, 12, 64, kind, dtype=dtype, recompute=False)
    count = direct(args, 12, 64, kind, BF16 if dtype == 'bfloat16' else None)
    assert abs(plan - count) <= 0.1 * count, (plan, count)


def test_recompute_term_is_one_block():
    args = asdict(M.create_model('vit_small_patch16', depth=6, img_size=64, grad_ckpt=True).config)
    extra = memplan.activation_bytes(args, 12, 64, 'train') - memplan.activation_bytes(args, 12, 64, 'train',
                                                                                       recompute=False)
    no_ckpt = {d: direct({**args, 'grad_ckpt': False, 'depth': d}, 12, 64, 'train') for d in (2, 3)}
    one_block = no_ckpt[3] - no_ckpt[2]
    assert abs(extra - one_block) <= 0.1 * one_block, (extra, one_block)


def test_memory_plan_components():
    args = asdict(M.create_model('vit_pico_patch4').config)
    n = sum(p.numel() for p in M.build_model(args).parameters())
    plan = memplan.memory_plan(args, 16, 32, pgd_steps=2, dtype='float32', ema=True, text_tower='tiny-text')
    assert plan['parameters'] == plan['gradients'] == plan['ema'] == 4 * n and plan['adamw_state'] == 8 * n
    assert plan['text_tower'] > 0 and plan['attack_activations'] > 0 and plan['train_activations'] > 0
    static = sum(v for k, v in plan.items() if k not in ('peak', 'eval_batch') and not k.endswith('_activations'))
    assert plan['peak'] == static + max(plan['attack_activations'], plan['train_activations'],
                                        plan['eval_activations'])
    assert plan['eval_batch'] == 16  # no budget: the micro batch


def test_plan_covers_the_fp32_final_evaluation_and_fits_its_batch():
    """bf16 training, fp32 final PGD at the micro batch: the evaluation is the peak, counted as a
    direct fp32 count of an attack step; with a budget, its batch is the largest that fits."""
    args = asdict(M.create_model('vit_small_patch16', depth=4, img_size=64).config)
    plan = memplan.memory_plan(args, 16, 64, pgd_steps=1, dtype='bfloat16')
    count = direct(args, 16, 64, 'attack')
    assert abs(plan['eval_activations'] - count) <= 0.1 * count, (plan['eval_activations'], count)
    assert plan['eval_activations'] > plan['train_activations'] > plan['attack_activations']
    static = plan['peak'] - plan['eval_activations']
    fixed, per_image = memplan.eval_activation_line(args, 64)
    budget = static + fixed + 5.5 * per_image  # room for 5 images, not 6
    fitted = memplan.memory_plan(args, 16, 64, pgd_steps=1, dtype='bfloat16', budget=budget)
    assert fitted['eval_batch'] == 5 and fitted['peak'] <= budget
    assert memplan.memory_plan(args, 16, 64, 1, dtype='bfloat16', budget=budget, eval_batch=12)['eval_batch'] == 12
