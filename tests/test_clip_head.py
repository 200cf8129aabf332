"""Tests of clip_head.py and the text tower it uses (open_clip_interop.py): the contrastive loss is
CLIP's symmetric InfoNCE, also gathered across DDP ranks, and PGD raises it; the zero-shot
classifier and the linear head made from it agree; the text tower's embedding cache matches fresh
encodings, loads from a local file and fails offline in one line; the caption side file, retrieval
recall under attack, and a contrastive stage through train.py that ends in zero-shot evaluation
and a labelled fine-tuning stage."""
import copy
import math
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import clip_head as ch  # noqa: E402
import open_clip_interop as oci  # noqa: E402
from conftest import N_SHARDS, PER_SHARD  # noqa: E402
from model import create_model  # noqa: E402

ROOT = str(Path(__file__).resolve().parents[1])


# -------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def tower():
    return oci.load_text_tower('tiny-text', pretrained=None, seed=0)


# -------------------------------------------------------------------- loss
def _eq2_by_hand(x, t, s):
    x, t = F.normalize(x.double(), dim=-1), F.normalize(t.double(), dim=-1)
    n, total = len(x), 0.0
    for i in range(n):
        i2t = s * (x[i] @ t[i]) - torch.logsumexp(torch.stack([s * (x[i] @ t[j]) for j in range(n)]), 0)
        t2i = s * (t[i] @ x[i]) - torch.logsumexp(torch.stack([s * (x[j] @ t[i]) for j in range(n)]), 0)
        total += i2t + t2i
    return -total / (2 * n)


def test_loss_is_eq2():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    loss = ch.ContrastiveLoss(init_scale=7.3)
    assert torch.allclose(loss(x, t).double(), _eq2_by_hand(x, t, 7.3), atol=1e-5)
    assert math.isclose(ch.ContrastiveLoss().scale().item(), 1 / 0.07, rel_tol=1e-5)
    big = ch.ContrastiveLoss(init_scale=1000.0)  # clamped at 100, as CLIP
    assert torch.allclose(big(x, t).double(), _eq2_by_hand(x, t, 100.0), atol=1e-4)
    l = loss(x, t)
    l.backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad != 0


class _Pair(nn.Module):
    def __init__(self, net, loss):
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, x, t):
        return self.loss(self.net(x), t)


def _ddp_worker(rank, port):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        x, t = torch.randn(8, 10), torch.randn(8, 6)
        net, loss = nn.Linear(10, 6), ch.ContrastiveLoss(init_scale=10.0)
        ref_net, ref_loss = copy.deepcopy(net), copy.deepcopy(loss)
        ref = ref_loss(ref_net(x), t, gather=False)  # single process, whole batch
        ref.backward()
        ddp = nn.parallel.DistributedDataParallel(_Pair(net, loss))
        local = slice(4 * rank, 4 * rank + 4)
        out = ddp(x[local], t[local])
        out.backward()
        assert torch.allclose(out, ref, atol=1e-6), (out, ref)
        for p, q in ((net.weight, ref_net.weight), (net.bias, ref_net.bias), (loss.logit_scale, ref_loss.logit_scale)):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), (p.grad, q.grad)
        # the attack's loss is local: no collectives, the rank's own batch only
        local_loss = ch.attack_loss_fn(loss)(net(x[local]), t[local])
        assert torch.allclose(local_loss, ch.contrastive_loss(net(x[local]), t[local], loss.scale()))
    finally:
        dist.destroy_process_group()


def test_ddp_loss_and_grads_match_single_process():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port,), nprocs=2, join=True)


def test_pgd_raises_contrastive_loss_and_stays_in_ball(tower):
    try:
        from attack import pgd
    except ImportError:
        pytest.skip('attack.py not available')
    torch.manual_seed(0)
    model = create_model('vit_pico_patch4', embed_out=tower.embed_dim)
    x = torch.rand(6, 3, 32, 32)
    txt = tower.encode([f'a photo of thing {i}' for i in range(6)])
    loss = ch.ContrastiveLoss()
    eps = 8 / 255
    x_adv = pgd(model, x, txt, ch.attack_loss_fn(loss), eps=eps, step_size=2 / 255, steps=5)
    with torch.no_grad():
        clean, adv = loss(model(x), txt), loss(model(x_adv), txt)
    assert adv > clean + 1e-3, (clean, adv)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


# -------------------------------------------------------------------- zero-shot
def test_zeroshot_head(tower):
    names, templates = ch.imagenet_classnames(), ch.imagenet_templates()
    assert len(names) == 1000 and names[0] == 'tench' and len(templates) == 80
    assert all(t.count('{}') == 1 for t in templates)
    w = ch.zeroshot_weights(tower, names[:10], templates[:4])
    assert w.shape == (10, tower.embed_dim) and torch.allclose(w.norm(dim=-1), torch.ones(10), atol=1e-5)
    by_hand = F.normalize(tower.encode([t.format(names[3]) for t in templates[:4]]).mean(0), dim=-1)
    assert torch.allclose(w[3], by_hand, atol=1e-6)

    torch.manual_seed(0)
    model = create_model('vit_pico_patch4', embed_out=tower.embed_dim).eval()
    with torch.no_grad():
        model.head.bias.normal_(0, 0.05)  # a non-zero projection bias must be carried over too
    zs = ch.ZeroShotClassifier(model, w).eval()
    x = torch.rand(16, 3, 32, 32)
    ft = copy.deepcopy(model)
    ft.head = ch.head_from_zeroshot(model, w)
    with torch.no_grad():
        z, zs_logits, ft_logits = model(x), zs(x), ft(x)
    assert torch.equal(zs_logits.argmax(1), ft_logits.argmax(1))
    # with feature_norm = |z| of an image, that image's logits are the zero-shot logits
    ft.head = ch.head_from_zeroshot(model, w, feature_norm=z[0].norm().item())
    with torch.no_grad():
        assert torch.allclose(ft(x[:1]), zs_logits[:1], atol=1e-4)
    # under the training's bf16 autocast the logits stay fp32 (bf16's spacing at 25 is 0.125: ties, zero DLR gaps)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        half = zs(x)
        feats = F.normalize(model(x).float(), dim=-1)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, 100.0 * feats @ w.float().T, rtol=0, atol=1e-5)


# -------------------------------------------------------------------- text tower
def test_cache_matches_fresh_computation(tower):
    tower._rows.clear()
    e1 = tower.encode(['a dog', 'a cat', 'a ship'])
    misses = tower.misses
    e2 = tower.encode(['a cat', 'a dog', 'a cat', 'a car'])
    assert tower.misses == misses + 1  # only 'a car' ran through the tower
    assert torch.equal(e2[0], e1[1]) and torch.equal(e2[1], e1[0]) and torch.equal(e2[2], e1[1])
    fresh = oci.load_text_tower('tiny-text', pretrained=None, seed=0)  # same seed: same weights
    assert torch.allclose(fresh.encode(['a cat', 'a dog', 'a cat', 'a car'], cache=False), e2, atol=1e-6)
    assert torch.allclose(e2.norm(dim=-1), torch.ones(4)) and e2.dtype == torch.float32
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.train().training
    assert not hasattr(tower.clip, 'visual')


def test_cache_evicts_least_recently_used_rows_correctly():
    """A 4-row table under a stream of batches that overflow it: every lookup equals a fresh
    encoding, and only texts missing from the table run through the tower."""
    small = oci.load_text_tower('tiny-text', pretrained=None, seed=0, cache_size=4)
    ref = oci.load_text_tower('tiny-text', pretrained=None, seed=0)
    words = [f'a photo of {w}' for w in ('dog', 'cat', 'ship', 'car', 'bird', 'frog')]
    for batch in (words[:3], words[2:5], [words[0], words[4], words[4]], words[1:5], words[3:6], words[:6]):
        misses = small.misses
        unique = list(dict.fromkeys(batch))  # more than 4: nothing is cached, all run
        expect_misses = len(unique) if len(unique) > 4 else len([t for t in unique if t not in small._rows])
        got = small.encode(batch)
        assert small.misses == misses + expect_misses and len(small._rows) <= 4
        torch.testing.assert_close(got, ref.encode(batch, cache=False), rtol=0, atol=1e-6)


@pytest.mark.parametrize('fmt', ['bin', 'safetensors'])
def test_tower_from_local_file(tmp_path, fmt):
    oc = oci._open_clip()
    torch.manual_seed(5)
    full = oc.create_model('tiny-text', pretrained=None).eval()
    path = str(tmp_path / f'open_clip_model.{fmt}')
    if fmt == 'bin':
        torch.save(full.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, path)
    tower = oci.load_text_tower('tiny-text', pretrained=path)
    tok = oc.get_tokenizer('tiny-text')
    with torch.no_grad():
        want = F.normalize(full.encode_text(tok(['a photo of a dog'])), dim=-1)
    assert torch.allclose(tower.encode(['a photo of a dog']), want, atol=1e-6)


def test_offline_error_is_one_line_and_fast(tmp_path, monkeypatch):
    cases = [dict(env='1'), dict(env=None)]  # HF_HUB_OFFLINE=1; or no network found by the probe
    for case in cases:
        if case['env']:
            monkeypatch.setenv('HF_HUB_OFFLINE', '1')
        else:
            monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
            monkeypatch.setattr(oci, '_online', lambda *a, **k: False)
        t = time.time()
        with pytest.raises(SystemExit) as e:
            oci.load_text_tower('ViT-L-14-CLIPA', 'datacomp1b', cache_dir=str(tmp_path))
        msg = str(e.value)
        assert time.time() - t < 5 and '\n' not in msg
        assert 'ViT-L-14-CLIPA' in msg and 'datacomp1b' in msg and 'pretrained=/path/' in msg
    with pytest.raises(SystemExit) as e:
        oci.load_text_tower('tiny-text', pretrained='/no/such/open_clip_pytorch_model.bin')
    assert '/no/such/open_clip_pytorch_model.bin' in str(e.value) and '\n' not in str(e.value)


def test_caption_side_file(tower, shards, tmp_path):
    out = tmp_path / 'captions.pt'
    n = ch.precompute_caption_embeddings(tower, str(shards / '{00000..00007}.tar'), out, batch_size=10)
    assert n == N_SHARDS * PER_SHARD
    emb = ch.load_caption_embeddings(out)
    keys = ['0030002', '0000000', '0070003']
    want = tower.encode(['caption 3 2', 'caption 0 0', 'caption 7 3'])
    got = emb[keys]
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=2e-3)
    with pytest.raises(KeyError):
        emb[['nope']]


# -------------------------------------------------------------------- train.py, end to end
def test_train_py_web_stage_then_zero_shot_then_fine_tune(tmp_path):
    """Contrastive adversarial training through train.py on demo shards with a tiny text tower:
    the zero-shot classifier beats chance, resume restores the stream, and a labelled stage
    starts from the zero-shot head."""
    import json
    import subprocess
    import sys
    import demo_data
    root = demo_data.ensure_demo(str(tmp_path / 'demo'), n_train=1200, n_val=200, shard_size=200)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    common = ['config/demo_clip.py', f"--train_data={root}/shards/train-{{0000..0005}}.tar",
              f'--val_data={root}/val',
              '--batch_size=32', '--log_every=320', '--warmup_samples=320', '--eps_warmup=1000', '--num_workers=1',
              '--shuffle_buffer=100', '--final_eval_samples=200', f'--out_dir={tmp_path}/web']
    run = lambda *a: subprocess.run([sys.executable, 'train.py', *common, *a], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=600)
    r = run('--samples=9600')
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(tmp_path / 'web' / 'results.json'))
    assert res['clean_acc'] > 15  # 10 classes: chance is 10% (seeds 0-2 gave 19.5, 33.5, 28.5 in 9.6k samples)
    from checkpoint import read_checkpoint
    ck = read_checkpoint(str(tmp_path / 'web'))
    assert ck['model_args']['embed_out'] == 256 and ck['data_state']['ranks'][0]['samples'] == 9600
    # eval_autoattack rebuilds the same zero-shot classifier from the checkpoint alone
    import eval_autoattack as ea
    from torchvision.datasets import ImageFolder
    import torchvision.transforms as T
    val = ImageFolder(f'{root}/val', T.Compose([T.Resize(ck['model_args']['img_size']), T.ToTensor()]))
    x, y = torch.stack([v[0] for v in val]), torch.tensor(val.targets)
    with torch.no_grad():
        acc = 100 * (ea.load_model(str(tmp_path / 'web'))(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(res['clean_acc'], abs=0.6)
    r = run('--samples=9600')  # the same command again: the stage is complete, nothing is retrained
    assert r.returncode == 0 and 'is complete' in r.stdout, r.stderr[-2000:]
    assert json.load(open(tmp_path / 'web' / 'results.json')) == res
    ft = subprocess.run([sys.executable, 'train.py', '--data=imagefolder', f'--train_data={root}/train',
                         f'--val_data={root}/val', f'--init_from={tmp_path}/web', '--samples=0',
                         '--final_eval_samples=200', f'--out_dir={tmp_path}/ft', '--num_workers=0'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ft.returncode == 0 and 'zero-shot classifier' in ft.stdout, ft.stderr[-2000:]
    # samples=0: the labelled head is exactly the zero-shot classifier (same argmax)
    assert json.load(open(tmp_path / 'ft' / 'results.json'))['clean_acc'] == pytest.approx(res['clean_acc'], abs=0.6)


class CaptionLookup(nn.Module):
    """An 'image tower' that knows each image's caption: image i (all pixels i / 100) embeds as the
    text tower's embedding of captions[perm[i]], plus a steep linear term in the pixels (zero on
    a constant image) that an attack can move."""

    def __init__(self, tower, captions, perm):
        super().__init__()
        self.register_buffer('table', tower.encode([captions[j] for j in perm], cache=False))
        self.mix = nn.Linear(3, self.table.shape[1], bias=False)
        nn.init.normal_(self.mix.weight, std=50.0)

    def forward(self, x):
        idx = (x[:, 0, 0, 0] * 100).round().long().clamp(0, len(self.table) - 1)
        return self.table[idx] + self.mix(x.mean((2, 3)) - x[:, :, :1, :1].mean((2, 3)))


def test_retrieval_recall_counts_the_caption_and_falls_under_attack(tower):
    captions = [f"{s}: a small red {s} on dots" for s in ('star', 'circle', 'heart', 'ring', 'cross', 'arrow')] * 2
    x = torch.arange(len(captions)).float().div(100).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
    perfect = CaptionLookup(tower, captions, range(len(captions)))
    assert ch.retrieval_recall_at_1(perfect, tower, x, captions) == 100.0  # repeated captions count as found
    shifted = CaptionLookup(tower, captions, [(i + 1) % 6 + 6 * (i // 6) for i in range(len(captions))])
    assert ch.retrieval_recall_at_1(shifted, tower, x, captions) == 0.0
    torch.manual_seed(0)
    attacked = ch.retrieval_recall_at_1(perfect, tower, x, captions, eps=0.004, steps=10, step_size=0.001)
    assert attacked <= 50.0


def test_training_accuracy_labels_under_bf16_autocast():
    """The training accuracy's labels from fp32 image features against bf16 caption or class
    embeddings (a trained text tower under autocast): the same labels as in fp32."""
    torch.manual_seed(0)
    out, emb = torch.randn(8, 16), torch.randn(8, 16)
    want = (F.normalize(out, dim=-1) @ F.normalize(emb, dim=-1).T).argmax(1)
    half = F.normalize(emb, dim=-1).bfloat16()
    assert torch.equal(ch.predicted_labels(out, half), want)
    assert torch.equal(ch.predicted_labels(out), out.argmax(1))
