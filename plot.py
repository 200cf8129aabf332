"""
Clean and PGD-20 accuracy of one or more runs against samples seen and against compute
spent (the paper's convention: forward MACs x (PGD steps + 1), summed over stages), read
from each run's log.jsonl, one line per run. With several runs it is an ablation's picture.

$ python plot.py out/demo_pre out/demo_mask_random out/demo_mask_block --out table1a.png
$ python plot.py out/demo_pre+out/demo_ft out/demo_mask_random+out/demo_mask_random_ft

`a+b` joins the stages of one recipe into one line (later stages continue the samples and
compute axes of the stage they started from). Points come from train.py's evaluations
(every eval_every samples on eval_samples images; each stage's final one, on
final_eval_samples images, drawn larger). Needs matplotlib (optional: pip install matplotlib).
"""
import argparse
import json
import os


def read_evals(run):
    """[(samples_total, compute_1e10, clean, pgd20, final)] from a run's log, in order."""
    path = os.path.join(run, 'log.jsonl') if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise SystemExit(f"plot.py: no log at {path} (pass a run's out_dir, which train.py fills with log.jsonl)")
    points = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"plot.py: {path} line {i} is not JSON (a truncated log? delete that line)")
            if 'clean_acc' in r:
                points.append((r.get('samples_total', r['samples']), r['compute_1e10'], r['clean_acc'],
                               r['pgd20_acc'], bool(r.get('final'))))
    if not points:
        raise SystemExit(f"plot.py: {path} has no evaluations yet (train with eval_every > 0, or let the run finish)")
    return points


def plot(runs, out, title=None):
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot.py needs matplotlib, an optional extra: pip install matplotlib")
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey='row')
    for run in runs:
        stages = run.split('+')
        pts = [p for stage in stages for p in read_evals(stage)]
        label = ' + '.join(os.path.basename(os.path.normpath(s)) for s in stages)
        samples, compute, clean, robust, final = zip(*pts)
        compute = [c * 1e10 for c in compute]  # GFLOPs (MACs)
        for row, acc in enumerate((clean, robust)):
            for col, xs in enumerate((samples, compute)):
                line, = axes[row][col].plot(xs, acc, marker='o', markersize=3, label=label)
                ends = [(x, a) for x, a, f in zip(xs, acc, final) if f]
                if ends:
                    axes[row][col].plot(*zip(*ends), marker='o', markersize=7, color=line.get_color(), ls='')
    for col, xlabel in enumerate(('samples seen', 'compute (GFLOPs, forward MACs x (PGD steps + 1))')):
        axes[1][col].set_xlabel(xlabel)
    axes[0][0].set_ylabel('clean accuracy (%)')
    axes[1][0].set_ylabel('PGD-20 accuracy (%)')
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)
    fig.suptitle(title or 'clean and PGD-20 accuracy', fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument('runs', nargs='+', help="runs' out_dirs (or log.jsonl files); stage1+stage2 joins stages")
    ap.add_argument('--out', default='plot.png', help='PNG to write')
    ap.add_argument('--title', default=None)
    args = ap.parse_args()
    print(f"wrote {plot(args.runs, args.out, args.title)}")


if __name__ == '__main__':
    main()
