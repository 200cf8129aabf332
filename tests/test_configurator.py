import os
import subprocess
import sys

import pytest

import configurator

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
