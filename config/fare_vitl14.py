# FARE (Schlarmann et al., "Robust CLIP", ICML 2024): unsupervised adversarial fine-tuning of
# OpenAI's CLIP ViT-L/14 image tower on ImageNet. Loss, for the attack and the update alike:
# ||phi(x_adv) - phi_orig(x)||_2^2 against a frozen copy phi_orig of the starting tower
# (unnormalised embeddings, summed over the embedding, mean over the batch: clip_head.FareLoss).
#   torchrun --nproc_per_node=8 train.py config/fare_vitl14.py                # FARE^2 (eps 2/255)
#   torchrun --nproc_per_node=8 train.py config/fare_vitl14.py --eps=4/255 --out_dir=out/fare4_vitl14
#   python eval_autoattack.py --ckpt out/fare2_vitl14 --data /data/imagenet --eps 2/255
# Published (RobustVLM README, CLIP-only avg. zero-shot over their datasets): FARE^2 67.0 clean,
# 43.1 at eps 2/255; FARE^4 61.1 clean, 45.9 at 2/255 (OpenAI CLIP: 73.1 / 0.0).
# Sources: github.com/chs20/RobustVLM README "Training" (the FARE^4 command; "Set --eps 2 to
# obtain ... FARE^2") and train/adversarial_training_clip.py (what each flag does).
out_dir = 'out/fare2_vitl14'
loss = 'fare'
init_from = 'ViT-L-14/openai'          # --clip_model_name ViT-L-14 --pretrained openai
text_tower = 'ViT-L-14'                # its text side: the zero-shot classifier for evaluation only
text_pretrained = 'openai'             # (FARE's loss never uses text)
data = 'imagefolder'                   # --dataset imagenet (the labels are never used by the loss)
train_data = '/data/imagenet/train'
val_data = '/data/imagenet/val'
num_classes = 1000
img_size = 224                         # open_clip's ViT-L-14 preprocess: Resize(224, bicubic) + CenterCrop(224)
crop_scale = (1.0, 1.0)                # no augmentation in their loader (the eval preprocessing, minus Normalize)
hflip = False
auto_augment = ''
mixup, cutmix = 0.0, 0.0
label_smoothing = 0.0
val_crop_pct = 1.0

# the recipe: README command
samples = 20_000 * 128                 # --steps 20000 --batch_size 128 (2.56M samples, 2 ImageNet epochs)
batch_size = 128                       # --batch_size 128
warmup_samples = 1_400 * 128           # --warmup 1400 (steps): 179,200 samples
lr = 1e-5                              # --opt adamw --lr 1e-5
min_lr = 0.0                           # open_clip's cosine_lr (training/scheduler.py) decays to 0
weight_decay = 1e-4                    # --wd 1e-4 (they decay every parameter; train.py skips biases, norms, embeddings)
beta1, beta2 = 0.9, 0.999              # torch.optim.AdamW defaults (their code passes no betas)
grad_clip = 0.0                        # no clipping in their training loop
drop_path_rate = 0.0
ema_decay = 0.0

# the attack: --attack pgd --inner_loss l2 --norm linf --eps 2 --iterations_adv 10 --stepsize_adv 1
norm = 'Linf'
eps = 2 / 255                          # FARE^2; FARE^4: eps = 4 / 255 (same step and steps)
pgd_steps = 10
pgd_step_size = 1 / 255
pgd_random_start = True                # uniform start in the eps-ball (their pgd's perturbation init)
eps_warmup = 0                         # full eps from the first step
eval_eps = 0.0                         # = eps (their in-training eval: APGD-CE at the training eps)
eval_pgd_steps = 20
eval_step_size = 1 / 255

# bookkeeping
num_workers = 8                        # their DataLoader(num_workers=8)
log_every = 12_800
eval_every = 256_000                   # 10 evaluations
eval_samples = 1_000
final_eval_samples = 5_000
ckpt_every = 256_000                   # they save 10 checkpoints over the run
