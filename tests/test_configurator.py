import ast
import os
import subprocess
import sys

import pytest

import configurator
from conftest import MAE_AA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def defaults():
    return {'lr': 1e-3, 'batch_size': 64, 'eps': 8 / 255, 'out_dir': 'out', 'compile': False,
            'crop_scale': (0.35, 1.0), 'init_from': 'scratch', 'max_samples': None}


def test_overrides_parse_literals_and_fractions():
    g = defaults()
    configurator.apply_config(g, ['--lr=3e-4', '--batch_size=128', '--eps=4/255', '--compile=True',
                                  '--out_dir=out/x', '--init_from=resume', '--crop_scale=[0.5, 1]', '--max_samples=10'])
    assert g == {'lr': 3e-4, 'batch_size': 128, 'eps': 4 / 255, 'out_dir': 'out/x', 'compile': True,
                 'crop_scale': (0.5, 1), 'init_from': 'resume', 'max_samples': 10}


def test_int_for_float_is_fine():
    g = defaults()
    configurator.apply_config(g, ['--lr=1'])
    assert g['lr'] == 1.0 and isinstance(g['lr'], float)


def test_unknown_key_names_closest():
    with pytest.raises(SystemExit, match=r"unknown config key 'batchsize'; did you mean batch_size"):
        configurator.apply_config(defaults(), ['--batchsize=3'])


def test_type_mismatch():
    with pytest.raises(SystemExit, match="config key 'batch_size' expects int"):
        configurator.apply_config(defaults(), ['--batch_size=big'])
    with pytest.raises(SystemExit, match="expects bool"):
        configurator.apply_config(defaults(), ['--compile=1'])


def test_config_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("import math\nlr = 0.5 * 2\nbatch_size = 32\n")
    g = defaults()
    configurator.apply_config(g, [str(f), '--batch_size=16'])
    assert g['lr'] == 1.0 and g['batch_size'] == 16
    f.write_text("learning_rate = 1.0\n")
    with pytest.raises(SystemExit, match=r"c.py: unknown config key 'learning_rate'"):
        configurator.apply_config(defaults(), [str(f)])
    with pytest.raises(SystemExit, match='config file not found'):
        configurator.apply_config(defaults(), [str(tmp_path / 'missing.py')])


def test_train_reports_one_line_errors():
    for args, msg in ((['--lrr=1'], "unknown config key 'lrr'"), (['config/nope.py'], 'config file not found'),
                      (['--dry_run=True', '--model=vit_enormous'], "unknown model 'vit_enormous'")):
        r = subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def write(folder, name, text):
    (folder / name).write_text(text)
    return str(folder / name)


def test_config_extends_a_base_next_to_it_from_any_directory(tmp_path, monkeypatch):
    write(tmp_path, 'base_x.py', "lr = 0.5\nbatch_size = 32\n")
    cfg = write(tmp_path, 'c.py', "# a header\nextends('base_x.py')\nbatch_size = 16\n")
    monkeypatch.chdir(ROOT)  # not the config's folder
    g = defaults()
    origin = configurator.apply_config(g, [cfg, '--eps=2/255'])
    assert g['lr'] == 0.5 and g['batch_size'] == 16 and g['eps'] == 2 / 255
    assert origin == {'lr': str(tmp_path / 'base_x.py'), 'batch_size': cfg, 'eps': 'command line'}
    lines = configurator.resolved_config(g, defaults(), origin)
    assert lines == [f"  lr = 0.5  ({tmp_path / 'base_x.py'})", f"  batch_size = 16  ({cfg})",
                     "  eps = 0.00784313725490196  (command line)"]


@pytest.mark.parametrize('files,msg', [
    ({'base_a.py': "extends('base_b.py')\n", 'base_b.py': "lr = 1.0\n", 'c.py': "extends('base_a.py')\n"},
     r"base_a.py: a base extends nothing \(it is extended by .*c.py\)"),
    ({'other.py': "lr = 1.0\n", 'c.py': "extends('other.py')\n"},
     r"extends\('other.py'\): a config extends only a base"),
    ({'base_a.py': "lr = 1.0\n", 'c.py': "batch_size = 8\nextends('base_a.py')\n"},
     r"c.py: extends\(...\) is allowed once, as the config's first statement"),
    ({'c.py': "exec(open('config/advxl_vitb_in1k.py').read())\n"}, r"c.py: exec\(\) in a config"),
    ({'c.py': "extends('base_gone.py')\n"}, r"c.py: base config not found: .*base_gone.py"),
    ({'base_a.py': "learning_rate = 1.0\n", 'c.py': "extends('base_a.py')\n"},
     r"base_a.py: unknown config key 'learning_rate'"),
    ({'c.py': "lr = 1e-3 *\n"}, r"c.py:1: invalid syntax: lr = 1e-3 \*")])
def test_inheritance_rule_errors_are_one_line(tmp_path, files, msg):
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(SystemExit, match=msg) as e:
        configurator.apply_config(defaults(), [str(tmp_path / 'c.py')])
    assert '\n' not in str(e.value.code)


def test_project_configs_extend_at_most_one_base():
    """A config reads alone, or with the one base its first line names; bases extend nothing."""
    folder = os.path.join(ROOT, 'config')
    bases = set()
    for name in sorted(os.listdir(folder)):
        src = open(os.path.join(folder, name)).read()
        tree = ast.parse(src)
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'id', '') in ('extends', 'exec')]
        if name.startswith('base_'):
            assert not calls, name
        elif calls:
            assert len(calls) == 1 and calls[0] is tree.body[0].value and calls[0].func.id == 'extends', name
            bases.add(calls[0].args[0].value)
    assert bases == {n for n in os.listdir(folder) if n.startswith('base_')}  # every base is used


def test_configs_follow_their_recipes():
    """Each paper config's augmentation is its cited recipe's, value by value (MAE Table 11 for
    ImageNet pre-training, MAE fine-tuning (Table 9 / main_finetune.py) for config/advxl_ft_in1k.py)."""
    def load(name):
        return configurator.read_config(os.path.join(ROOT, 'config', f'{name}.py'))
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'config')) if f.startswith('advxl_'))
    seen = set()
    for name in names:
        c = load(name)
        if c['data'] == 'webdataset':  # CLIPA's recipe: no RandAugment, MixUp, CutMix or erasing
            assert c['auto_augment'] == '' and c['mixup'] == c['cutmix'] == c['reprob'] == 0.0, name
            seen.add('web')
            continue
        assert c['auto_augment'] == MAE_AA and c['mixup'] == 0.8 and c['cutmix'] == 1.0, name
        assert c['label_smoothing'] == 0.1 and tuple(c['crop_scale']) == (0.08, 1.0) and c.get('hflip', True), name
        assert c['reprob'] == (0.25 if '_ft' in name else 0.0), name  # MAE fine-tuning / Table 11
        assert c['val_crop_pct'] == 0.9 and c['val_interpolation'] == 'bicubic', name  # the official evaluation
        assert c['train_interpolation'] == 'bilinear' and c['num_workers'] >= 1, name  # the paper's resize
        seen.add('ft' if '_ft' in name else 'pre')
    assert seen == {'web', 'ft', 'pre'}
