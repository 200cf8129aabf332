# Exercise (paper Table 1c at toy scale): skip fine-tuning. Evaluates the 16 px stage-1 run
# at full resolution (32 px) without training it further (samples = 0): config/demo_ft.py's
# stage with no training step.
#   python train.py config/demo_no_ft.py
out_dir = 'out/demo_no_ft'
init_from = 'out/demo_pre'
img_size = 32
samples = 0
final_eval_samples = 500
# config/demo_ft.py's other values (no step is taken with samples = 0)
lr = 1e-3
warmup_samples = 800
pgd_steps = 3
pgd_step_size = 2.5 * (8 / 255) / 3   # 2.5 eps / steps: the usual PGD step rule
eps_warmup = 0
log_every = 2048
eval_every = 2000
