# The embedded demo's second stage: fine-tune `python train.py`'s run at full resolution
# (32 px) with PGD-3, then print the final table. Both stages, one line:
#   python train.py && python train.py config/demo_ft.py
out_dir = 'out/demo_ft'
init_from = 'out/demo_pre'
img_size = 32
samples = 8000
lr = 1e-3
warmup_samples = 800
pgd_steps = 3
pgd_step_size = 2.5 * (8 / 255) / 3   # 2.5 eps / steps: the usual PGD step rule
eps_warmup = 0                        # stage 1 already ramped eps up
final_eval_samples = 500
log_every = 2048
eval_every = 0                        # the final evaluation only: at 32 px an interim one costs minutes (docs/demo.md)
