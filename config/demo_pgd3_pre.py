# Exercise (paper Table 1b at toy scale): a stronger attack in pre-training, PGD-3 instead
# of PGD-1 (twice the compute per sample); fine-tune as usual and compare with the default.
#   python train.py config/demo_pgd3_pre.py
#   python train.py config/demo_ft.py --init_from=out/demo_pgd3_pre --out_dir=out/demo_pgd3_pre_ft
out_dir = 'out/demo_pgd3_pre'
pgd_steps = 3
pgd_step_size = 2.5 * (8 / 255) / 3   # 2.5 eps / steps, as config/demo_ft.py
