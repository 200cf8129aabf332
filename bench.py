"""
Benchmarks, each a ratio measured in the same run (never a wall-clock assert).
So far one row: AutoAttack, eval_autoattack.py against the official code (pyautoattack
0.2.0) on the same model and points, standard version. More rows (training step vs a
timm + torchattacks baseline, two-stage vs one-stage, GPU MFU) are issue #6's.

$ python train.py && python train.py config/demo_ft.py     # the demo's robust model
$ python bench.py --quick                                   # 30 demo val points, L_inf 8/255
Prints a markdown table and writes bench.json.
"""
import argparse
import json
import logging
import re
import time

import torch

import eval_autoattack as ea


def official_autoattack(model, x, y, norm, eps, seed, bs):
    """pyautoattack's standard run: robust mask and its per-attack cumulative robust accuracy."""
    from pyautoattack import AutoAttack
    aa = AutoAttack(model, norm=norm, eps=eps, version='standard', seed=seed, device=str(x.device))
    lines = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    aa.logger.addHandler(handler)
    aa.logger.setLevel(logging.DEBUG)
    aa.logger.propagate = False
    t0 = time.time()
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=bs)
    seconds = time.time() - t0
    per_attack = {m.group(1): float(m.group(2)) for m in
                  (re.match(r'robust accuracy after (\S+): ([\d.]+)%', l) for l in lines) if m}
    return y_adv == y, per_attack, seconds


def bench_autoattack(ckpt, n, norm, eps, seed, bs):
    model = ea.load_model(ckpt)
    x, y, desc = ea.load_demo_val(model.config.img_size, n)
    t0 = time.time()
    ours = ea.evaluate(model, x, y, norm=norm, eps=eps, seed=seed, batch_size=bs)
    ours_s = time.time() - t0
    ref_robust, ref_per_attack, ref_s = official_autoattack(model, x, y, norm, eps, seed, bs)
    diff = int((ours['robust'].cpu() != ref_robust.cpu()).sum())
    rows = [(name.upper(), ours['per_attack'][name], ref_per_attack.get(name.upper(), float('nan')))
            for name in ours['per_attack']]
    return {'model': ckpt, 'points': desc, 'norm': norm, 'eps': eps, 'ours_s': ours_s, 'official_s': ref_s,
            'autoattack_speedup_vs_official': ref_s / ours_s, 'autoattack_max_diff_points': diff,
            'clean_acc': ours['clean_acc'], 'per_attack': rows}


def main():
    ap = argparse.ArgumentParser(description='nanoAdvXL benchmarks')
    ap.add_argument('--quick', action='store_true', help='30 points instead of 500')
    ap.add_argument('--ckpt', default='out/demo_ft', help='robust model to attack (default: the demo)')
    ap.add_argument('--n', type=int, default=0, help='points (default 100 with --quick, else 500)')
    ap.add_argument('--norm', default='Linf')
    ap.add_argument('--eps', default='8/255')
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.n or (30 if args.quick else 500)
    r = bench_autoattack(args.ckpt, n, args.norm, ea.parse_eps(args.eps), 0, 250)
    print(f"\nAutoAttack standard {args.norm} eps {args.eps} on {r['points']} of {args.ckpt} "
          f"({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} CPU threads)\n")
    print('| | ours | official (pyautoattack) |\n|---|---|---|')
    print(f"| clean | {r['clean_acc']:.1f}% | |")
    for name, a, b in r['per_attack']:
        print(f"| after {name} | {a:.1f}% | {b:.1f}% |")
    print(f"| wall time | {r['ours_s']:.1f} s | {r['official_s']:.1f} s |")
    print(f"\nspeed-up {r['autoattack_speedup_vs_official']:.2f}x, points judged differently: "
          f"{r['autoattack_max_diff_points']}")
    json.dump(r, open('bench.json', 'w'), indent=2)


if __name__ == '__main__':
    main()
