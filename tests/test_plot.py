import json
import os

import pytest

import plot


def write_log(run, points, final_clean):
    os.makedirs(run)
    with open(os.path.join(run, 'log.jsonl'), 'w') as f:
        for s in points:  # a training record between evaluations, as train.py writes them
            f.write(json.dumps({'stage': 'x', 'samples': s, 'loss': 1.0, 'compute_1e10': s * 1e-12}) + '\n')
            f.write(json.dumps({'stage': 'x', 'samples': s, 'samples_total': s, 'clean_acc': 50 + s / 1000,
                                'pgd20_acc': 20 + s / 2000, 'compute_1e10': s * 1e-12}) + '\n')
        f.write(json.dumps({'stage': 'x', 'samples': points[-1], 'clean_acc': final_clean, 'pgd20_acc': 30.0,
                            'compute_1e10': points[-1] * 1e-12, 'final': True}) + '\n')


def test_read_evals_keeps_only_evaluations(tmp_path):
    write_log(tmp_path / 'a', [1000, 2000], 61.0)
    pts = plot.read_evals(str(tmp_path / 'a'))
    assert [p[0] for p in pts] == [1000, 2000, 2000]
    assert pts[-1][2:] == (61.0, 30.0, True) and pts[0][2] == 51.0


def test_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match='no log at'):
        plot.read_evals(str(tmp_path / 'missing'))
    os.makedirs(tmp_path / 'empty')
    (tmp_path / 'empty' / 'log.jsonl').write_text(json.dumps({'samples': 8, 'loss': 1.0}) + '\n')
    with pytest.raises(SystemExit, match='no evaluations yet'):
        plot.read_evals(str(tmp_path / 'empty'))


def test_plot_writes_png(tmp_path):
    pytest.importorskip('matplotlib', reason='matplotlib is an optional extra (pip install matplotlib)')
    write_log(tmp_path / 'run_a', [1000, 2000, 3000], 60.0)
    write_log(tmp_path / 'run_b', [1500, 3000], 55.0)
    out = str(tmp_path / 'ablation.png')
    write_log(tmp_path / 'run_b_ft', [3500, 4000], 58.0)
    plot.plot([str(tmp_path / 'run_a'), f"{tmp_path / 'run_b'}+{tmp_path / 'run_b_ft'}"], out)
    with open(out, 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n'
    width, height = int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')
    assert (width, height) == (1200, 840)  # figsize 10x7 at 120 dpi


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch):
    write_log(tmp_path / 'run_a', [1000], 60.0)
    monkeypatch.setitem(__import__('sys').modules, 'matplotlib', None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match='plot.py needs matplotlib, an optional extra: pip install matplotlib'):
        plot.plot([str(tmp_path / 'run_a')], str(tmp_path / 'x.png'))
