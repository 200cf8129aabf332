# TeCoA (Mao et al. 2023) on the demo: supervised robust fine-tuning of the plain CLIP tower,
# cross-entropy over cosine similarities with the class prompts; the same budget as demo_fare.
#   python train.py config/demo_clip_plain.py      # once: the plain tower it starts from
#   python train.py config/demo_tecoa.py
out_dir = 'out/demo_tecoa'
loss = 'tecoa'
tecoa_templates = ()              # train on the run's own prompt ensemble: a random text tower knows no
                                  # 'This is a photo of a {}' (README: one plain prompt gets 53% zero-shot, the ensemble 66%)
# config/demo_fare.py's budget and attack
init_from = 'out/demo_clip_plain'
data = 'demo'                     # labelled images: the class prompts are TeCoA's targets
img_size = 16                     # the tower's resolution
samples = 8000
batch_size = 64
lr = 3e-4
min_lr = 1e-5
warmup_samples = 800
weight_decay = 1e-4               # FARE's wd 1e-4, for the same budget
beta2 = 0.999
eps = 8 / 255
pgd_steps = 5
pgd_step_size = 2 / 255
eps_warmup = 2000
label_smoothing = 0.0
final_eval_samples = 500
log_every = 2048
eval_every = 0
