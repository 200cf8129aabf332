# Base of the ImageNet-1K fine-tuning configs (paper Sec. 4.1; every row of Tables 2, 3 and 5
# fine-tunes on ImageNet-1K whatever the pre-training data): 38.4M samples (20 epochs) at
# 224 px with PGD-3, step 4/255, from a pre-training run, with MAE's end-to-end fine-tuning
# recipe (He et al. 2022, Table 9), without layer-wise decay. A config starts from it with
#   extends('base_finetune.py')
# and sets its model, init_from, lr and drop_path_rate (MAE's per-model values),
# micro_batch_size, grad_ckpt and num_workers. A web-trained tower gets its class head from
# the CLIP zero-shot classifier. Fine-tuning another source than the config's init_from, give
# the run its own --out_dir (out/<source>_ft): a checkpoint of the same stage in out_dir is
# resumed whatever init_from says. A base extends nothing.
data = 'imagefolder'              # full-resolution originals at 224 / 336 px
train_data = '/data/imagenet/train'
val_data = '/data/imagenet/val'
num_classes = 1000

# the AdvXL schedule (paper Sec. 4.1)
img_size = 224
samples = 38_400_000
eps = 4 / 255                     # the pre-training's eps: only the attack's steps grow
pgd_steps = 3
pgd_step_size = 4 / 255
eps_warmup = 0                    # the paper does not warm up eps

# optimisation: MAE fine-tuning (Table 9; main_finetune.py's defaults and FINETUNE.md's command)
batch_size = 1024
min_lr = 1e-6                     # MAE main_finetune.py --min_lr default
warmup_samples = 5 * 1_281_167    # MAE: 5 warm-up epochs
weight_decay = 0.05               # MAE Table 9
beta1, beta2 = 0.9, 0.999         # MAE Table 9
grad_clip = 0.0                   # MAE fine-tuning: no clipping (--clip_grad None)
ema_decay = 0.0                   # MAE fine-tuning: no EMA
# augmentation: MAE fine-tuning (Table 9; main_finetune.py's defaults and FINETUNE.md's command)
auto_augment = 'rand-m9-mstd0.5-inc1'  # MAE Table 9 "RandAug (9, 0.5)" (--aa rand-m9-mstd0.5-inc1)
mixup, cutmix = 0.8, 1.0          # MAE Table 9 (--mixup 0.8 --cutmix 1.0)
label_smoothing = 0.1             # MAE Table 9 (--smoothing 0.1)
reprob = 0.25                     # MAE fine-tuning: random erasing 0.25, mode 'pixel', 1 box (--reprob 0.25)
crop_scale = (0.08, 1.0)          # timm's RandomResizedCrop default (MAE's build_transform), ratio (3/4, 4/3)
train_interpolation = 'bilinear'  # as pre-training: paper Sec. 3.1's anti-aliased bilinear (MAE's timm default: bicubic)
val_crop_pct = 0.9                # validation as the official AdvXL evaluation: resize int(S/0.9) bicubic,
val_interpolation = 'bicubic'     # then center crop S (eval_autoattack.py's default)

# bookkeeping
log_every = 409_600
eval_every = 3_840_000
eval_samples = 10_000
final_eval_samples = 0            # the whole 50k val set
ckpt_every = 1_280_000
# Each config sets, for its model: micro_batch_size and grad_ckpt, the largest micro batch that
# fits 8 x 80 GB GPUs with ~10% headroom and the least recomputation (`--dry_run=True` prints
# the plan); num_workers, loader workers per GPU = 1.2 x the GPU's training rate / one core's
# rate for the stage's input pipeline, at least 2 (docs/input-pipeline.md).
