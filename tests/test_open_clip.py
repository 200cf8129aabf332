"""open_clip image towers in our ViT (model.from_open_clip, open_clip_interop.open_clip_state_dict),
the TeCoA and FARE losses, and eval_autoattack on an open_clip model. Offline: open_clip builds
every architecture with pretrained=None; a tiny config registered here stands in for real weights."""
import json
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import clip_head as ch
import eval_autoattack as ea
import model as M
import open_clip_interop as oci
from attack import pgd

TINY = 'tiny-clip-vit'  # 32 px, patch 8 (16 tokens + class), width 64, 2 heads, 2 layers; a tiny text tower
TINY_TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)


@pytest.fixture(scope='module', autouse=True)
def tiny_config(tmp_path_factory):
    d = tmp_path_factory.mktemp('oc_configs')
    cfg = dict(embed_dim=48, vision_cfg=dict(image_size=32, patch_size=8, width=64, head_width=32, layers=2,
                                             mlp_ratio=2.0), text_cfg=TINY_TEXT)
    (d / f'{TINY}.json').write_text(json.dumps(cfg))
    oci._open_clip().add_model_config(d)


def build(name, seed=0, **kw):
    """A random open_clip model (small text tower: only the image side is compared) whose image
    tower's every tensor, LayerNorms included, is randomised so a mismatch shows."""
    oc = oci._open_clip()
    torch.manual_seed(seed)
    m = oc.create_model(name, pretrained=None, text_cfg=TINY_TEXT, **kw).eval()
    with torch.no_grad():
        for p in m.visual.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.2))
    return m


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def encode(oc_model, x):
    with torch.no_grad():
        return oc_model.encode_image((x - torch.tensor(oci.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(oci.CLIP_STD).view(1, 3, 1, 1))


# ----------------------------------------------------------------------------- image tower parity
L14_SHALLOW = dict(vision_cfg=dict(image_size=112, layers=2, width=1024, patch_size=14))  # L-14's blocks, 2 of 24


@pytest.mark.parametrize('name,kw', [
    ('ViT-B-32', {}), ('ViT-B-32-quickgelu', {}), ('ViT-B-16', {}),
    ('ViT-L-14', L14_SHALLOW),  # width 1024, 16 heads, patch 14 at 112 px; the full depth is the slow case below
    pytest.param('ViT-L-14', dict(force_image_size=112), marks=pytest.mark.slow)])
def test_matches_open_clip_and_exports_back(name, kw):
    oc = build(name, **kw)
    ours = M.from_open_clip(oc).eval()
    assert ours.config.act == ('quick_gelu' if 'quickgelu' in name else 'gelu')
    assert ours.config.mean == oci.CLIP_MEAN and ours.config.embed_out == oc.visual.output_dim
    torch.manual_seed(1)
    x = torch.rand(1, 3, ours.config.img_size, ours.config.img_size)
    with torch.no_grad():
        a = ours(x)
    b = encode(oc, x)
    assert rel_err(a, b) < 1e-5, name
    if name == 'ViT-L-14' and not kw.get('vision_cfg'):
        return  # the export is depth-generic and checked on the others; the full L-14's copy costs seconds
    # round trip: the export loads strictly into a fresh open_clip tower and gives the same embeddings
    with torch.no_grad():
        for p in oc.visual.parameters():
            p.zero_()
    oc.visual.load_state_dict(oci.open_clip_state_dict(ours))
    assert torch.equal(encode(oc, x), b)


def test_wrong_activation_is_detected():
    oc = build(TINY)
    x = torch.rand(2, 3, 32, 32)
    sd = oc.visual.state_dict()
    with pytest.raises(ValueError, match='quick_gelu'):
        M.from_open_clip(sd)  # a bare state dict does not say its activation
    right = M.from_open_clip(sd, quick_gelu=False, num_heads=2).eval()  # heads cannot be read off a state dict
    wrong = M.from_open_clip(sd, quick_gelu=True, num_heads=2).eval()
    with torch.no_grad():
        assert rel_err(right(x), encode(oc, x)) < 1e-5
        assert rel_err(wrong(x), encode(oc, x)) > 1e-3  # the parity check can fail
    with pytest.raises(ValueError, match='contradicts'):
        M.from_open_clip(oc, quick_gelu=True)


def test_full_state_dict_and_visual_module_give_the_same_tower():
    oc = build(TINY, force_quick_gelu=True)
    a = M.from_open_clip(oc)
    assert a.config.act == 'quick_gelu' and a.config.num_heads == 2
    b = M.from_open_clip({f'module.{k}': v for k, v in oc.state_dict().items()}, quick_gelu=True, num_heads=2)
    c = M.from_open_clip(oc.visual)
    assert asdict(a.config) == asdict(b.config) == asdict(c.config)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and torch.equal(v, c.state_dict()[k])


def test_config_round_trips_through_our_checkpoint_format(tmp_path):
    ours = M.from_open_clip(build(TINY))
    path = tmp_path / 'ckpt.pt'
    torch.save({'model': ours.state_dict(), 'model_args': asdict(ours.config)}, path)
    back = M.model_from_file(str(path))
    assert asdict(back.config) == asdict(ours.config)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), ours.eval()(x))


def test_other_resolution_and_unsupported_towers():
    oc = build(TINY)
    big = M.from_open_clip(oc, img_size=48)
    assert big.pos_embed.shape[1] == 1 + 36 and big.config.img_size == 48
    ls = oci._open_clip().create_model(TINY, pretrained=None, text_cfg=TINY_TEXT,
                                      vision_cfg=dict(image_size=32, patch_size=8, width=64, head_width=32, layers=2,
                                                      ls_init_value=0.1))
    with pytest.raises(ValueError, match='unexpected keys'):
        M.from_open_clip(ls)


def test_tower_config_without_weights_matches_the_loaded_tower():
    assert asdict(oci.open_clip_tower_config(TINY)) == asdict(oci.load_open_clip_image_tower(TINY).config)
    l14 = oci.open_clip_tower_config('ViT-L-14/openai')  # the tag's QuickGELU, read without any download
    assert (l14.act, l14.embed_dim, l14.depth, l14.num_heads, l14.patch_size, l14.embed_out) == \
        ('quick_gelu', 1024, 24, 16, 14, 768)
    assert oci.open_clip_tower_config('ViT-L-14').act == 'gelu'


# ----------------------------------------------------------------------------- specs, files, offline
def test_spec_parsing():
    assert oci.parse_open_clip_spec('ViT-L-14/openai') == ('ViT-L-14', 'openai', [])
    assert oci.parse_open_clip_spec('ViT-B-32') == ('ViT-B-32', None, [])
    assert oci.parse_open_clip_spec('ViT-L-14/openai:/w/fare.pt') == ('ViT-L-14', 'openai', ['/w/fare.pt'])
    assert oci.parse_open_clip_spec('out/demo_clip') is None and not oci.is_open_clip_spec('no-such-model/x')
    assert oci.open_clip_text_source('ViT-L-14/openai:/w/fare.pt') == ('ViT-L-14', 'openai')
    oc = oci._open_clip()
    assert oci._tag_quick_gelu(oc, 'ViT-B-32', 'openai') and not oci._tag_quick_gelu(oc, 'ViT-B-32', None)


def test_offline_pretrained_tag_fails_in_one_line(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(SystemExit) as e:
        oci.load_open_clip_image_tower('ViT-B-32/openai', cache_dir='/nonexistent-cache')
    msg = str(e.value)
    assert '\n' not in msg and 'hf download timm/vit_base_patch32_clip_224.openai' in msg
    assert "'ViT-B-32-quickgelu:/path/to/open_clip_pytorch_model.bin'" in msg
    with pytest.raises(SystemExit, match='weights file not found'):
        oci.load_open_clip_image_tower(f'{TINY}:/no/such/file.pt')


def test_local_files_full_then_image_tower_on_top(tmp_path):
    oc = build(TINY, seed=3)
    torch.save(oc.state_dict(), tmp_path / 'full.pt')
    tuned = build(TINY, seed=4)  # e.g. a FARE release: the image tower's state dict alone
    torch.save(oci.open_clip_state_dict(M.from_open_clip(tuned)), tmp_path / 'visual.pt')
    x = torch.rand(2, 3, 32, 32)
    vit, tower = oci.load_open_clip(f"{TINY}:{tmp_path / 'full.pt'}", text=True)
    with torch.no_grad():
        assert rel_err(vit.eval()(x), encode(oc, x)) < 1e-5
        toks = tower.tokenizer(['a photo of a cat'])
        assert torch.allclose(tower.encode(['a photo of a cat']), F.normalize(oc.encode_text(toks), dim=-1), atol=1e-6)
    vit2 = oci.load_open_clip_image_tower(f"{TINY}:{tmp_path / 'full.pt'}:{tmp_path / 'visual.pt'}")
    with torch.no_grad():
        assert rel_err(vit2.eval()(x), encode(tuned, x)) < 1e-5
    torch.save({'junk': torch.zeros(1)}, tmp_path / 'bad.pt')
    with pytest.raises(SystemExit, match='does not fit'):
        oci.load_open_clip_image_tower(f"{TINY}:{tmp_path / 'bad.pt'}")


# ----------------------------------------------------------------------------- TeCoA and FARE
def test_tecoa_loss_is_cross_entropy_over_cosine_logits():
    torch.manual_seed(0)
    emb, w = torch.randn(6, 48) * 3, torch.randn(10, 48)
    y = torch.randint(0, 10, (6,))
    logits = 100 * (emb / emb.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(ch.tecoa_loss(emb, y, w), F.cross_entropy(logits, y))
    soft = torch.softmax(torch.randn(6, 10), 1)
    torch.testing.assert_close(ch.tecoa_loss_fn(w, logit_scale=50)(emb, soft), F.cross_entropy(logits / 2, soft))


def test_fare_loss_zero_at_start_and_frozen_copy_stays_out_of_training():
    torch.manual_seed(0)
    vit = M.from_open_clip(build(TINY))
    fare = ch.FareLoss(vit)
    x = torch.rand(4, 3, 32, 32)
    target = fare.targets(x)
    assert not target.requires_grad and target.dtype == torch.float32
    assert fare(vit.eval()(x), target).item() == 0.0  # the tower unchanged and x_adv == x
    explicit = ((vit(x + 0.01) - target) ** 2).sum(1).mean()  # summed over the embedding, mean over the batch
    torch.testing.assert_close(fare(vit(x + 0.01), target), explicit)
    # training the tower never touches the copy: no grad, not in the optimizer, always eval
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-2)
    assert not {id(p) for p in fare.orig.parameters()} & {id(p) for g in opt.param_groups for p in g['params']}
    before = [p.clone() for p in fare.orig.parameters()]
    vit.train(), fare.train()
    loss = fare(vit(x + 0.01), target)
    loss.backward()
    opt.step()
    assert all(not p.requires_grad and p.grad is None for p in fare.orig.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, fare.orig.parameters()))
    assert not fare.orig.training and fare(vit.eval()(x), target).item() > 0


def test_fare_loss_under_bf16_autocast_is_zero_at_start():
    # bf16 training: the copy keeps fp32 weights and buffers (CLIP's mean/std, norms, pos_embed) and
    # runs under the same autocast, so at step 0 phi_orig(x) == phi(x) to the bit
    torch.manual_seed(0)
    vit = M.from_open_clip(build(TINY)).eval()
    half = ch.FareLoss(vit, dtype=torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in list(half.orig.parameters()) + list(half.orig.buffers())
               if t.is_floating_point())
    x = torch.rand(4, 3, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        emb = vit(x)
        assert emb.dtype == torch.bfloat16  # the autocast really ran the tower in bf16
        assert half(emb, half.targets(x)).item() == 0.0
    assert 0 < rel_err(half.targets(x), ch.FareLoss(vit).targets(x)) < 0.1  # bf16 targets, to bf16 precision


def test_pgd_maximises_the_fare_and_tecoa_losses():
    torch.manual_seed(0)
    start = M.from_open_clip(build(TINY))
    fare = ch.FareLoss(start)
    tuned = M.from_open_clip(build(TINY, seed=1)).eval()  # the tower after some training
    x = torch.rand(4, 3, 32, 32)
    target = fare.targets(x)
    eps = 4 / 255
    x_adv = pgd(tuned, x, target, fare, eps, 1 / 255, 10, random_start=False)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    with torch.no_grad():
        assert fare(tuned(x_adv), target) > fare(tuned(x), target) > 0
    w, y = torch.randn(10, 48), torch.randint(0, 10, (4,))
    loss = ch.tecoa_loss_fn(w)
    x_adv = pgd(tuned, x, y, loss, eps, 1 / 255, 5, random_start=False)
    with torch.no_grad():
        assert loss(tuned(x_adv), y) > loss(tuned(x), y)


# ----------------------------------------------------------------------------- evaluation
def test_eval_cli_takes_an_open_clip_model(tmp_path, capsys):
    res = ea.main(['--ckpt', TINY, '--n_ex', '6', '--bs', '6', '--attacks', 'apgd-ce', '--eps', '8/255',
                   '--out_dir', str(tmp_path), '--device', 'cpu'])
    out = capsys.readouterr().out
    assert 'clean' in out and 'apgd-ce' in out and res['n'] == 6
    assert 0 <= res['robust_acc'] <= res['clean_acc'] <= 100
    assert os.path.isfile(tmp_path / 'autoattack_Linf_8-255.json')
    res = ea.main(['--ckpt', TINY, '--n_ex', '6', '--bs', '6', '--pgd20', '--eps', '8/255', '--out_dir', str(tmp_path),
                   '--device', 'cpu'])
    assert 0 <= res['robust_acc'] <= res['clean_acc'] <= 100
    # the zero-shot classifier: CLIP's 80 templates over the demo's class names
    m = ea.load_model(TINY, classnames=['circle', 'square'])
    tower = oci.load_open_clip(TINY, text=True)[1]
    torch.testing.assert_close(m.weights, ch.zeroshot_weights(tower, ['circle', 'square']))
    assert len(ch.imagenet_templates()) == 80


def test_eval_takes_a_fare_run_of_ours(tmp_path):
    vit = oci.load_open_clip_image_tower(TINY)
    cfg = dict(loss='fare', text_tower=TINY, text_pretrained='', seed=0, num_classes=10, data='imagefolder',
               val_data='data_cache/demo/val', prompt_templates=())
    torch.save({'model': vit.state_dict(), 'model_args': asdict(vit.config), 'config': cfg}, tmp_path / 'ckpt.pt')
    m = ea.load_model(str(tmp_path / 'ckpt.pt'))
    assert isinstance(m, ch.ZeroShotClassifier) and m.weights.shape == (10, 48)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
