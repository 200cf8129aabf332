# The demo's one-stage control for the paper's central claim (bench.py's two_stage row):
# no token reduction, no weak attack: 32 px and PGD-3 for the same 72k samples the two
# stages see (64k at 16 px with PGD-1, then 8k at 32 px with PGD-3), about 4.6x the compute.
#   python train.py config/demo_onestage.py
out_dir = 'out/demo_onestage'
img_size = 32
samples = 72000
pgd_steps = 3
pgd_step_size = 2.5 * (8 / 255) / 3   # as config/demo_ft.py
final_eval_samples = 500
