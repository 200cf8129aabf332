import math
from dataclasses import asdict

import pytest
import timm
import torch

import model as M


def timm_twin(ours, **kw):
    """timm's ViT with our model's shape and weights (timm is fed the normalised image)."""
    c = ours.config
    t = timm.models.vision_transformer.VisionTransformer(
        img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio, num_classes=c.num_classes, global_pool=c.global_pool, class_token=c.class_token,
        dynamic_img_size=True, **kw)
    t.load_state_dict(ours.timm_state_dict())
    return t.eval()


@pytest.mark.parametrize('name', ['vit_tiny_patch16', 'vit_small_patch16', 'vit_base_patch16'])
@pytest.mark.parametrize('pool', ['avg', 'token'])
def test_logits_match_timm(name, pool):
    torch.manual_seed(0)
    ours = M.create_model(name, global_pool=pool, num_classes=17).eval()
    theirs = timm_twin(ours)
    sizes = (224, 112) if name != 'vit_base_patch16' else (224,)
    for r in sizes + (160,):
        x = torch.rand(2, 3, r, r)
        with torch.no_grad():
            a, b = ours(x), theirs((x - ours.mean) / ours.std)
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5, (name, pool, r)


@pytest.mark.parametrize('name,timm_name', [('vit_huge_patch14', 'vit_huge_patch14_224'),
                                            ('vit_giant_patch14', 'vit_giant_patch14_224')])
def test_big_presets_have_timms_shapes(name, timm_name):
    with torch.device('meta'):
        ours = M.create_model(name, img_size=336)
        theirs = timm.create_model(timm_name, img_size=336, global_pool='avg', num_classes=1000)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b


def test_position_embedding_resized_at_load_equals_resized_at_forward():
    torch.manual_seed(0)
    m224 = M.create_model('vit_tiny_patch16', num_classes=5).eval()
    for r in (112, 336):
        m_r = M.create_model('vit_tiny_patch16', num_classes=5, img_size=r).load_weights(m224.timm_state_dict()).eval()
        x = torch.rand(2, 3, r, r)
        with torch.no_grad():
            torch.testing.assert_close(m_r(x), m224(x), rtol=1e-5, atol=1e-5)
        assert m_r.pos_embed.shape[1] == 1 + (r // 16) ** 2


def test_pos_cache_follows_optimizer_updates():
    torch.manual_seed(0)
    m = M.create_model('vit_pico_patch4').eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        first = m(x)
        assert torch.equal(first, m(x))  # the cached grid gives the same answer
    with torch.no_grad():
        m.pos_embed.add_(0.5)  # an in-place update, as an optimizer step does
        assert not torch.allclose(first, m(x))
    m.train()
    m(x).sum().backward()  # training at another size still reaches the position embedding
    assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0


def test_random_masking_keeps_count_per_sample():
    x = torch.arange(64).float().view(1, 64, 1).expand(4, 64, 3)
    out = M.mask_tokens(x, (8, 8), 0.75, 'random')
    assert out.shape == (4, 16, 3)
    kept = out[..., 0].long()
    assert all(len(set(r.tolist())) == 16 for r in kept)  # no token kept twice
    assert len({tuple(sorted(r.tolist())) for r in kept}) > 1  # a different subset per sample


@pytest.mark.parametrize('ratio', [0.5, 0.75])
def test_block_masking_keeps_one_contiguous_block(ratio):
    torch.manual_seed(0)
    grid = (14, 14)
    x = torch.arange(196).float().view(1, 196, 1).expand(8, 196, 2)
    out = M.mask_tokens(x, grid, ratio, 'block')
    h, w = M.block_shape(grid, round(196 * (1 - ratio)))
    assert out.shape[1] == h * w == round(196 * (1 - ratio))
    for r in out[..., 0].long():
        rows, cols = r // 14, r % 14
        assert set(rows.tolist()) == set(range(rows.min(), rows.min() + h))
        assert set(cols.tolist()) == set(range(cols.min(), cols.min() + w))
    m = M.create_model('vit_tiny_patch16', num_classes=3)
    assert m(torch.rand(2, 3, 224, 224), mask_ratio=ratio, mask_kind='block').shape == (2, 3)


def vit_macs(n_patches, tokens, D, depth, hidden, patch_in):
    # by hand: patch embedding + per block qkv, QK^T, AV, proj, fc1, fc2
    per_block = tokens * D * 3 * D + tokens * tokens * D * 2 + tokens * D * D + tokens * D * hidden * 2
    return n_patches * patch_in * D + depth * per_block


def test_flops_by_hand():
    b = M.create_model('vit_base_patch16')
    assert b.flops(224) == vit_macs(196, 197, 768, 12, 3072, 768)
    assert abs(b.flops(224) / 1e9 - 17.56) < 0.01  # the paper's ~17.6 G
    assert abs(b.flops(112) / 1e9 - 4.3) < 0.05    # and ~4.3 G
    assert b.flops(224, mask_ratio=0.5) == vit_macs(196, 99, 768, 12, 3072, 768)
    # 4x4 grid keeping 30%: random keeps round(11.2) = 11 tokens, block masking a 3x4 block of 12
    assert b.flops(64, 0.3, 'random') == vit_macs(16, 12, 768, 12, 3072, 768)
    assert b.flops(64, 0.3, 'block') == vit_macs(16, 13, 768, 12, 3072, 768)
    with torch.device('meta'):
        h = M.create_model('vit_huge_patch14')
    assert h.flops(84) == vit_macs(36, 37, 1280, 32, 5120, 588)
    # the paper's compute column: ViT-B/16, 256M@112 PGD-1 + 38.4M@224 PGD-3 = 0.5e10 GFLOPs
    total = (256e6 * b.flops(112) * 2 + 38.4e6 * b.flops(224) * 4) / 1e19
    assert abs(total - 0.5) / 0.5 < 0.03


def test_official_layout_checkpoint_roundtrip(tmp_path):
    """An official-style file: timm layout at 336 px, GAP + fc_norm, wrapped and prefixed."""
    torch.manual_seed(0)
    t = timm.create_model('vit_tiny_patch16_224', img_size=336, global_pool='avg', num_classes=1000).eval()
    wrapped = {'state_dict': {'module.' + k: v for k, v in t.state_dict().items()}}
    torch.save(wrapped, tmp_path / 'official.pth')
    ours = M.model_from_file(str(tmp_path / 'official.pth')).eval()
    assert ours.config.img_size == 336 and ours.config.global_pool == 'avg' and ours.config.class_token
    x = torch.rand(1, 3, 336, 336)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), t((x - ours.mean) / ours.std), rtol=1e-5, atol=1e-5)
    assert set(ours.timm_state_dict()) == set(t.state_dict())


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    small = M.create_model('vit_small_patch16').timm_state_dict()
    with pytest.raises(ValueError, match='shape mismatch'):
        M.create_model('vit_tiny_patch16').load_weights(small)
    small.pop('fc_norm.weight')
    with pytest.raises(ValueError, match='missing keys'):
        M.create_model('vit_small_patch16').load_weights(small)
    (tmp_path / 'junk.pt').write_text('not a checkpoint')
    with pytest.raises(SystemExit, match='cannot read checkpoint'):
        M.model_from_file(str(tmp_path / 'junk.pt'))
    with pytest.raises(ValueError, match='unknown model'):
        M.create_model('vit_enormous')


# -------------------------------------------------------------------- ConvNeXt
def randomise_vectors(m):
    """Norm weights, biases and layer scales away from their init (zeros, ones, 1e-6), so that every
    residual branch counts and a bias loaded into the wrong place shows."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                scale = name.endswith(('weight', 'gamma'))
                p.copy_((1 if scale else 0) + (0.2 if scale else 0.1) * torch.randn_like(p))
    return m


@pytest.mark.parametrize('name,batch,sizes', [('convnext_tiny', 2, (64, 96)), ('convnext_base', 1, (64, 96))])
def test_convnext_logits_match_timm(name, batch, sizes):
    torch.manual_seed(0)
    ours = randomise_vectors(M.create_model(name, num_classes=17)).eval()
    with torch.device('meta'):  # timm's own init is not needed: it takes our weights
        theirs = timm.create_model(name, pretrained=False, num_classes=17)
    theirs.load_state_dict(ours.timm_state_dict(), assign=True)  # strict: our export is timm's layout, key for key
    theirs.eval()
    for r in sizes:
        x = torch.rand(batch, 3, r, r)
        with torch.no_grad():
            a, b = ours(x), theirs((x - ours.mean) / ours.std)
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5, (name, r)


def test_convnext_loads_timm_file(tmp_path):
    """timm -> ours: a wrapped, prefixed timm state dict gives a ConvNeXt read off the weights."""
    torch.manual_seed(0)
    t = timm.create_model('convnext_tiny', pretrained=False, num_classes=7, depths=(1, 1, 2, 1))
    t = randomise_vectors(t).eval()
    torch.save({'state_dict': {'module.' + k: v for k, v in t.state_dict().items()}}, tmp_path / 'timm.pth')
    ours = M.model_from_file(str(tmp_path / 'timm.pth')).eval()
    c = ours.config
    assert isinstance(ours, M.ConvNeXt) and (c.depths, c.dims, c.num_classes, c.img_size) == (
        (1, 1, 2, 1), (96, 192, 384, 768), 7, 224)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), t((x - ours.mean) / ours.std), rtol=1e-5, atol=1e-5)
    assert M.config_from_timm_state_dict(t.state_dict(), arch='convnext_demo').img_size == 32
    with pytest.raises(ValueError, match='not a ConvNeXt preset'):
        M.config_from_timm_state_dict(t.state_dict(), arch='vit_tiny_patch16')
    # a new task: skip_head keeps our head.fc but still loads head.norm
    new = M.build_model({**asdict(c), 'num_classes': 3}).load_weights(t.state_dict(), skip_head=True)
    assert torch.equal(new.head.norm.weight, t.head.norm.weight) and new.get_classifier().out_features == 3
    with pytest.raises(ValueError, match='shape mismatch'):
        M.build_model({**asdict(c), 'num_classes': 3}).load_weights(t.state_dict())
    sd = t.state_dict()
    sd.pop('stages.2.blocks.1.gamma')
    with pytest.raises(ValueError, match=r"missing keys \['stages.2.blocks.1.gamma'\]"):
        ours.load_weights(sd)


def test_convnext_refuses_masking():
    m = M.create_model('convnext_demo')
    with pytest.raises(ValueError, match='masking is a ViT token operation'):
        m(torch.rand(1, 3, 32, 32), mask_ratio=0.5)
    with pytest.raises(ValueError, match='masking is a ViT token operation'):
        m.flops(32, mask_ratio=0.5, mask_kind='block')


def test_convnext_flops():
    # fvcore's counts in the ConvNeXt paper (Liu et al. 2022, Table 1/2), in G multiply-accumulates at 224
    refs = {'convnext_tiny': 4.5, 'convnext_small': 8.7, 'convnext_base': 15.4, 'convnext_large': 34.4}
    for name, ref in refs.items():
        with torch.device('meta'):
            m = M.create_model(name)
        assert abs(m.flops() / 1e9 - ref) / ref < 0.02, (name, m.flops())
    # by hand for the demo at 16 px (stem stride 1): maps 16, 8, 4, 2
    d = M.create_model('convnext_demo')
    block = lambda n, D: n * n * (49 * D + 8 * D * D)
    hand = (16 * 16 * 3 * 32 + block(16, 32) + 8 * 8 * 32 * 4 * 64 + block(8, 64)
            + 4 * 4 * 64 * 4 * 128 + 3 * block(4, 128) + 2 * 2 * 128 * 4 * 256 + block(2, 256))
    assert d.flops(16) == hand
    assert d(torch.rand(2, 3, 16, 16)).shape == (2, 10)


def test_convnext_options_are_validated():
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['global_pool'\] for 'convnext_tiny'"):
        M.create_model('convnext_tiny', global_pool='avg')
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['dims'\]"):
        M.create_model('vit_pico_patch4', dims=(8, 16, 32, 64))


def test_convnext_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = randomise_vectors(M.create_model('convnext_demo', drop_path_rate=0.1)).eval()
    args = asdict(m.config)
    args['depths'] = list(args['depths'])  # as a config read back from elsewhere may hold it
    torch.save({'model': m.state_dict(), 'model_args': args}, tmp_path / 'ckpt.pt')
    back = M.model_from_file(str(tmp_path / 'ckpt.pt')).eval()
    assert isinstance(back, M.ConvNeXt) and back.config == m.config  # lists come back as tuples
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    assert isinstance(M.build_model(asdict(M.create_model('vit_pico_patch4').config)), M.ViT)


def test_convnext_drop_path_in_train_mode_only():
    torch.manual_seed(0)
    m = M.create_model('convnext_demo', drop_path_rate=0.5, ls_init_value=1.0)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(m.train()(x), m(x))
        assert torch.equal(m.eval()(x), m(x))


@pytest.mark.parametrize('name,key', [('vit_pico_patch4', 'head'), ('convnext_demo', 'head.fc')])
def test_classifier_swap(name, key):
    m = M.create_model(name)
    assert m.classifier_key() == key and m.get_classifier() is m.get_submodule(key)
    m.set_classifier(torch.nn.Linear(m.get_classifier().in_features, 3))
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 3) and m.state_dict()[key + '.weight'].shape[0] == 3


def test_a_run_that_kept_an_ema_is_read_as_its_ema(tmp_path):
    """The weights a run evaluated and hands on (train.py: its EMA where it kept one) are the ones
    eval_autoattack and export read, not the raw model's."""
    from dataclasses import asdict
    torch.manual_seed(0)
    live, ema = M.create_model('vit_pico_patch4'), M.create_model('vit_pico_patch4')
    ckpt = {'model': live.state_dict(), 'ema': ema.state_dict(), 'model_args': asdict(live.config)}
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    got = M.model_from_file(str(tmp_path / 'ckpt.pt')).state_dict()
    assert all(torch.equal(got[k], ema.state_dict()[k]) for k in got)
    assert not all(torch.equal(got[k], live.state_dict()[k]) for k in got)
    torch.save({**ckpt, 'ema': None}, tmp_path / 'plain.pt')
    got = M.model_from_file(str(tmp_path / 'plain.pt')).state_dict()
    assert all(torch.equal(got[k], live.state_dict()[k]) for k in got)
