"""export.py: tiny train.py runs on a small demo set exported in timm's and open_clip's folder layouts,
loaded back by those libraries through 'local-dir:' and compared with our model (image features,
logits, text embeddings, temperature, preprocessing); the folders evaluated by eval_autoattack."""
import contextlib
import io
import math
import os
import runpy
import signal
import sys
from dataclasses import asdict

import pytest
import torch

import demo_data
import eval_autoattack as ea
import export
import model as M
import open_clip_interop as oci
from checkpoint import read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*argv):
    """train.py in this process: no interpreter start, torch and open_clip imported once."""
    saved = sys.argv, os.getcwd(), torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    sys.argv = ['train.py', *argv]
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path('train.py', run_name='__main__')
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        torch.set_num_threads(saved[2])
        signal.signal(signal.SIGTERM, saved[3])


pytestmark = pytest.mark.usefixtures('one_thread')  # (conftest.py)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    return demo_data.ensure_demo(str(tmp_path_factory.mktemp('export') / 'demo'), n_train=64, n_val=40,
                                 shard_size=64)


@pytest.fixture(scope='module')
def runs(demo, tmp_path_factory):
    """One step of each kind of run: labelled ViT and ConvNeXt (AdvXL recipe), contrastive
    against a frozen random text tower, and FARE and TeCoA from that one."""
    out = tmp_path_factory.mktemp('runs')
    short = ['--samples=16', '--batch_size=16', '--log_every=16', '--eval_every=0', '--final_eval_samples=4',
             '--num_workers=0', '--cpu_threads=1', '--warmup_samples=16', '--eps_warmup=0']
    labelled = ['--data=imagefolder', f'--train_data={demo}/train', f'--val_data={demo}/val']
    train(*labelled, *short, '--model=vit_pico_patch4', '--img_size=32', f'--out_dir={out}/vit')
    train('config/demo_convnext.py', *labelled, *short, f'--out_dir={out}/convnext')
    train('config/demo_clip.py', f'--train_data={demo}/shards/train-0000.tar', f'--val_data={demo}/val',
          '--model=vit_pico_patch4', '--text_tower=tiny-text', '--shuffle_buffer=16', *short, f'--out_dir={out}/clip')
    for loss in ('fare', 'tecoa'):
        train(f'config/demo_{loss}.py', *labelled, *short, '--pgd_steps=1', '--model=vit_pico_patch4',
              f'--init_from={out}/clip', f'--out_dir={out}/{loss}')
    return {k: str(out / k) for k in ('vit', 'convnext', 'clip', 'fare', 'tecoa')}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def pixels(net, n=4, seed=0):
    """[0,1] images at the model's size, and the same normalised as timm's and open_clip's transforms do."""
    torch.manual_seed(seed)
    s = net.config.img_size
    x = torch.rand(n, 3, s, s)
    return x, (x - torch.tensor(net.config.mean).view(1, 3, 1, 1)) / torch.tensor(net.config.std).view(1, 3, 1, 1)


def ours(path):
    return M.model_from_file(path).eval()


def load_timm(folder):
    import timm
    return timm.create_model('local-dir:' + folder, pretrained=True).eval()


def load_open_clip(folder):
    oc = oci._open_clip()
    model, _, preprocess = oc.create_model_and_transforms('local-dir:' + folder)
    return model.eval(), preprocess, oc.get_tokenizer('local-dir:' + folder)


def refusal(*argv):
    with pytest.raises(SystemExit) as e:
        export.main([str(a) for a in argv])
    msg = str(e.value)
    assert '\n' not in msg
    return msg


# ----------------------------------------------------------------------------- timm
@pytest.mark.parametrize('kind', ['vit', 'convnext'])
def test_timm_folder_of_a_labelled_run_gives_our_features_and_logits(runs, kind, tmp_path):
    import timm
    d = export.main([runs[kind], '--to', 'timm', '--out', str(tmp_path / 'x')])
    assert sorted(os.listdir(d)) == ['config.json', 'model.safetensors']
    t, net = load_timm(d), ours(runs[kind])
    x, xn = pixels(net)
    with torch.no_grad():
        assert rel_err(t.forward_head(t.forward_features(xn), pre_logits=True), net.forward_features(x)) < 1e-5
        assert rel_err(t(xn), net(x)) < 1e-5
    # the preprocessing timm builds: our mean/std (normalisation moved out of the model), size, resize, crop
    cfg = timm.data.resolve_data_config({}, model=t)
    s = net.config.img_size
    assert tuple(cfg['mean']) == net.config.mean and tuple(cfg['std']) == net.config.std
    assert cfg['input_size'] == (3, s, s) and cfg['interpolation'] == 'bilinear' and cfg['crop_pct'] == 1.0
    norm = timm.data.create_transform(**cfg).transforms[-1]
    assert norm.mean.tolist() == pytest.approx(list(net.config.mean))
    assert norm.std.tolist() == pytest.approx(list(net.config.std))
    assert t.pretrained_cfg['label_names'] == sorted(demo_data.DEMO_CLASSES)  # the label order of the run


def test_timm_folder_of_a_clip_tower_gives_its_embedding(runs, tmp_path):
    d = export.main([runs['clip'], '--to', 'timm', '--out', str(tmp_path / 'x')])
    t, net = load_timm(d), ours(runs['clip'])
    x, xn = pixels(net)
    with torch.no_grad():
        assert t(xn).shape == (4, 64) and rel_err(t(xn), net(x)) < 1e-5  # the projection is timm's head
    from safetensors.torch import load_file
    assert torch.equal(load_file(os.path.join(d, export.ZEROSHOT_FILE))['weights'],
                       read_checkpoint(runs['clip'])['zeroshot_weights'])


# ----------------------------------------------------------------------------- open_clip
def text_reference(ckpt, state_dict=None):
    """The run's text tower as train.py built it (or with `state_dict` loaded): open_clip's CLIP, text side."""
    cfg = ckpt['config']
    tower = oci.load_text_tower(cfg['text_tower'], cfg['text_pretrained'] or None, seed=cfg['text_seed'])
    if state_dict is not None:
        tower.clip.load_state_dict(state_dict, strict=False)
    return tower.clip


TEXTS = ['circle: a small red circle on dots', 'a photo of a star', '']


@pytest.mark.parametrize('kind', ['clip', 'fare', 'tecoa'])
def test_open_clip_folder_of_a_clip_run_gives_both_towers(runs, kind, tmp_path):
    d = export.main([runs[kind], '--to', 'open_clip', '--out', str(tmp_path / 'x')])
    assert sorted(os.listdir(d)) == ['open_clip_config.json', 'open_clip_model.safetensors']
    model, preprocess, tokenizer = load_open_clip(d)
    ckpt, net = read_checkpoint(runs[kind]), ours(runs[kind])
    x, xn = pixels(net)
    with torch.no_grad():
        assert rel_err(model.encode_image(xn), net(x)) < 1e-5
        tokens = tokenizer(TEXTS)
        assert rel_err(model.encode_text(tokens), text_reference(ckpt).encode_text(tokens)) < 1e-5
    # the temperature: a contrastive run's learned one; TeCoA/FARE: 100, as their zero-shot classifier
    want = float(ckpt['contrastive']['logit_scale']) if kind == 'clip' else math.log(100)
    assert model.logit_scale.item() == pytest.approx(want, rel=1e-6)
    assert kind != 'clip' or abs(want - math.log(ckpt['config']['logit_scale_init'])) > 1e-4  # (it was trained)
    # the transform open_clip builds: resize the short side, center crop, our mean/std
    s = net.config.img_size
    resize, crop, *_, norm = preprocess.transforms
    assert resize.size == s and resize.interpolation.value == 'bilinear' and crop.size == (s, s)
    assert tuple(norm.mean) == net.config.mean and tuple(norm.std) == net.config.std


def test_a_trained_text_tower_in_the_checkpoint_is_the_one_exported(runs, tmp_path):
    """A joint run stores its trained text tower as ckpt['text_model'] (open_clip's key names, no visual):
    the export carries those weights, not the rebuilt frozen tower's."""
    ckpt = dict(read_checkpoint(runs['clip']))
    frozen = text_reference(ckpt)
    torch.manual_seed(1)
    trained = {k: v + 0.05 * torch.randn_like(v) for k, v in frozen.state_dict().items()}
    trained['logit_scale'] = torch.tensor(math.log(20.0))  # the contrastive one stays the temperature
    ckpt['text_model'] = trained
    torch.save(ckpt, tmp_path / 'joint.pt')
    d = export.main([str(tmp_path / 'joint.pt'), '--to', 'open_clip', '--out', str(tmp_path / 'x')])
    model, _, tokenizer = load_open_clip(d)
    tokens = tokenizer(TEXTS)
    with torch.no_grad():
        got = model.encode_text(tokens)
        assert rel_err(got, text_reference(ckpt, trained).encode_text(tokens)) < 1e-5
        assert rel_err(got, frozen.encode_text(tokens)) > 1e-2
    assert model.logit_scale.item() == pytest.approx(float(ckpt['contrastive']['logit_scale']), rel=1e-6)


def clip_checkpoint(net, path, text_tower='tiny-text'):
    """A CLIP run's checkpoint around `net` (as a web run writes it), for layouts no demo run trains."""
    torch.manual_seed(2)
    with torch.no_grad():  # every tensor away from its init, so a mismatch shows
        for p in net.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.2))
    cfg = dict(data='webdataset', loss='', text_tower=text_tower, text_pretrained='', seed=0, text_seed=0,
               prompt_templates=(), val_interpolation='bicubic', val_crop_pct=1.0)
    torch.save({'model': net.state_dict(), 'model_args': asdict(net.config), 'ema': None, 'config': cfg,
                'contrastive': {'logit_scale': torch.tensor(3.0)},
                'zeroshot_weights': torch.nn.functional.normalize(torch.randn(10, net.config.embed_out), dim=-1)}, path)
    return net.eval()


VITS = {  # the layouts our ViTs take: timm's (avg pool or token), CLIP's (pre-norm, no biases), mixes
    'avg, patch and head bias': dict(),
    'token pool, pre-norm and patch bias, no qkv bias': dict(global_pool='token', pre_norm=True, qkv_bias=False),
    "CLIP's": dict(global_pool='token', pre_norm=True, patch_bias=False, head_bias=False, norm_eps=1e-5),
    'no patch bias, no pre-norm, no head bias': dict(patch_bias=False, head_bias=False),
}


@pytest.mark.parametrize('variant', VITS)
def test_every_vit_layout_exports_exactly(variant, tmp_path):
    net = clip_checkpoint(M.create_model('vit_pico_patch4', embed_out=64, **VITS[variant]), tmp_path / 'run.pt')
    x, xn = pixels(net)
    model = load_open_clip(export.main([str(tmp_path / 'run.pt'), '--to', 'open_clip', '--out', str(tmp_path / 'o')]))[0]
    t = load_timm(export.main([str(tmp_path / 'run.pt'), '--to', 'timm', '--out', str(tmp_path / 't')]))
    with torch.no_grad():
        want = net(x)
        assert rel_err(model.encode_image(xn), want) < 1e-5
        assert rel_err(t(xn), want) < 1e-5


def test_convnext_clip_tower_through_open_clips_timm_tower(tmp_path):
    """timm's registered ConvNeXt sizes go through open_clip's timm tower (built by name); other shapes,
    like the demo's, have no open_clip layout and are refused in one line."""
    net = clip_checkpoint(M.create_model('convnext_tiny', embed_out=64, img_size=32), tmp_path / 'run.pt')
    d = export.main([str(tmp_path / 'run.pt'), '--to', 'open_clip', '--out', str(tmp_path / 'o')])
    model, preprocess, _ = load_open_clip(d)
    x, xn = pixels(net, n=2)
    with torch.no_grad():
        assert rel_err(model.encode_image(xn), net(x)) < 1e-5
    assert preprocess.transforms[0].interpolation.value == 'bicubic'
    clip_checkpoint(M.create_model('convnext_demo', embed_out=64), tmp_path / 'demo.pt')
    msg = refusal(tmp_path / 'demo.pt', '--to', 'open_clip', '--out', tmp_path / 'd')
    assert "timm's registered ConvNeXt sizes" in msg
    assert not os.path.exists(tmp_path / 'd')


def test_the_ema_weights_are_exported_where_the_run_kept_them(tmp_path):
    net = clip_checkpoint(M.create_model('vit_pico_patch4', embed_out=64), tmp_path / 'run.pt')
    ckpt = torch.load(tmp_path / 'run.pt', weights_only=True)
    ema = {k: v + 0.1 for k, v in ckpt['model'].items()}
    torch.save({**ckpt, 'ema': ema}, tmp_path / 'ema.pt')
    t = load_timm(export.main([str(tmp_path / 'ema.pt'), '--to', 'timm', '--out', str(tmp_path / 't')]))
    x, xn = pixels(net)
    with torch.no_grad():
        assert rel_err(t(xn), net.load_weights(ema)(x)) < 1e-5


def test_a_hugging_face_tokenizer_goes_into_the_folder(tmp_path):
    """open_clip reads a Hugging Face tokenizer (CLIPA's) from the 'local-dir:' folder itself: the export
    saves it there. A tiny word-piece tokenizer made here stands in for bert-base-uncased."""
    import json
    from transformers import BertTokenizerFast
    words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'small', 'red', 'circle', 'on', 'dots', 'star', ':']
    (tmp_path / 'vocab.txt').write_text('\n'.join(words) + '\n')
    BertTokenizerFast(str(tmp_path / 'vocab.txt')).save_pretrained(str(tmp_path / 'tok'))
    (tmp_path / 'cfg').mkdir()
    text_cfg = dict(context_length=16, vocab_size=len(words), width=32, heads=2, layers=1,
                    hf_tokenizer_name=str(tmp_path / 'tok'), tokenizer_kwargs=dict(strip_sep_token=True))
    (tmp_path / 'cfg' / 'tiny-text-hf.json').write_text(json.dumps(dict(embed_dim=64, vision_cfg=oci.TINY_VISION,
                                                                        text_cfg=text_cfg)))
    oci._open_clip().add_model_config(tmp_path / 'cfg')
    net = clip_checkpoint(M.create_model('vit_pico_patch4', embed_out=64), tmp_path / 'run.pt', 'tiny-text-hf')
    d = export.main([str(tmp_path / 'run.pt'), '--to', 'open_clip', '--out', str(tmp_path / 'o')])
    assert 'tokenizer.json' in os.listdir(d)
    model, _, tokenizer = load_open_clip(d)
    tower = oci.load_text_tower('tiny-text-hf', None)
    tokens = tokenizer(TEXTS)
    assert torch.equal(tokens, tower.tokenizer(TEXTS)) and (tokens > 4).sum() >= 10  # the words, not [UNK]s
    with torch.no_grad():
        assert rel_err(model.encode_text(tokens), tower.clip.encode_text(tokens)) < 1e-5
        x, xn = pixels(net)
        assert rel_err(model.encode_image(xn), net(x)) < 1e-5


def test_refusals_are_one_line(runs, tmp_path):
    assert 'no text tower' in refusal(runs['vit'], '--to', 'open_clip', '--out', tmp_path / 'a')
    assert 'not empty' in refusal(runs['vit'], '--to', 'timm', '--out', ROOT)
    assert 'no checkpoint' in refusal(tmp_path, '--to', 'timm', '--out', tmp_path / 'b')
    torch.save(M.create_model('vit_pico_patch4').state_dict(), tmp_path / 'timm.pt')
    assert 'not a checkpoint train.py wrote' in refusal(tmp_path / 'timm.pt', '--to', 'timm', '--out', tmp_path / 'c')
    # the activation open_clip applies to both towers must be the image tower's
    clip_checkpoint(M.create_model('vit_pico_patch4', embed_out=64, act='quick_gelu'), tmp_path / 'q.pt')
    assert 'one activation for both towers' in refusal(tmp_path / 'q.pt', '--to', 'open_clip', '--out', tmp_path / 'd')


# ----------------------------------------------------------------------------- eval_autoattack
@pytest.mark.parametrize('kind,to', [('vit', 'timm'), ('clip', 'open_clip'), ('clip', 'timm')])
def test_eval_autoattack_on_a_folder_counts_as_on_the_run(runs, demo, kind, to, tmp_path, monkeypatch):
    """PGD-20 on the demo val points: the exported folder, loaded by timm or open_clip, gives the clean and
    robust counts of the run's checkpoint (open_clip: with the zero-shot classifier of its own text tower)."""
    monkeypatch.setattr(demo_data, 'ensure_demo', lambda *a, **k: demo)  # the small demo set stands in
    d = export.main([runs[kind], '--to', to, '--out', str(tmp_path / 'x')])
    common = ['--pgd20', '--n_ex', '24', '--eps', '8/255', '--device', 'cpu', '--out_dir', str(tmp_path)]
    run = ea.main(['--ckpt', runs[kind], *common])
    folder = ea.main(['--ckpt', 'local-dir:' + d, *common])
    assert run['n'] == folder['n'] == 24
    assert (folder['n_clean'], folder['n_robust']) == (run['n_clean'], run['n_robust'])
    x, _, _ = ea.load_demo_val(run['img_size'], 24)  # the same classifier, logit for logit
    with torch.no_grad():
        assert rel_err(ea.load_model('local-dir:' + d, classnames=sorted(demo_data.DEMO_CLASSES))(x),
                       ea.load_model(runs[kind])(x)) < 1e-5
    # the dry run and memory plan read the folder's config alone: the same architecture as the run's
    dry = ea.main(['--ckpt', 'local-dir:' + d, '--dry_run', '--device', 'cpu'])
    args = read_checkpoint(runs[kind])['model_args']
    assert ea.model_args_desc(dry['model_args'], dry['img_size']) == ea.model_args_desc(args, args['img_size'])
    assert dry['model_args']['mean'] == tuple(args['mean'])
