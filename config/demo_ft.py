# The embedded demo's second stage: fine-tune `python train.py`'s run at full resolution
# (32 px), then print the final table. Both stages, one line:
#   python train.py && python train.py config/demo_ft.py
# The attack stays PGD-1 here: at this scale a stronger one (PGD-2/3) cost clean accuracy in
# so short a stage without adding robustness (docs/demo.md); `--pgd_steps=3
# --pgd_step_size=7/255` shows it.
out_dir = 'out/demo_ft'
init_from = 'out/demo_pre'
img_size = 32
samples = 6000
lr = 1e-3
warmup_samples = 600
pgd_steps = 1
pgd_step_size = 8 / 255               # FGSM with a random start, as stage 1
eps_warmup = 0                        # stage 1 already ramped eps up
final_eval_samples = 500
log_every = 2048
eval_every = 0                        # the final evaluation only: at 32 px an interim one costs minutes (docs/demo.md)
