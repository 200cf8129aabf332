# FARE (Schlarmann et al. 2024) on the demo: unsupervised robust fine-tuning of the plain CLIP
# tower against a frozen copy of itself; zero-shot evaluation with the run's own text tower.
#   python train.py config/demo_fare.py
out_dir = 'out/demo_fare'
init_from = 'out/demo_clip_plain'
loss = 'fare'
data = 'demo'                     # labelled images; FARE's loss never reads the labels
img_size = 16                     # the tower's resolution
samples = 8000
batch_size = 64
lr = 3e-4
min_lr = 1e-5
warmup_samples = 800
weight_decay = 1e-4               # FARE: wd 1e-4
beta2 = 0.999
eps = 8 / 255
pgd_steps = 5
pgd_step_size = 2 / 255
eps_warmup = 2000
label_smoothing = 0.0
final_eval_samples = 500
log_every = 2048
eval_every = 0
