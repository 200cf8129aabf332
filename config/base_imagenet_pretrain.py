# Base of the ImageNet pre-training configs (paper Table 2's ImageNet rows, Table 1's ablations,
# Table 3's ConvNeXt-B): the AdvXL pre-training schedule on ImageNet-1K shards with MAE's
# supervised from-scratch ViT recipe. A config starts from it with
#   extends('base_imagenet_pretrain.py')
# and sets its model (with drop_path_rate, micro_batch_size, grad_ckpt, num_workers) and what
# else differs. A base extends nothing.
data = 'shards'                    # labelled shards, pre-resized: python make_shards.py /data/imagenet/train /data/imagenet-shards/train
train_data = '/data/imagenet-shards/train/shard-{000000..001281}.tar'   # (the pattern make_shards.py prints)
val_data = '/data/imagenet/val'
num_classes = 1000

# the AdvXL schedule (paper Sec. 4.1)
img_size = 112             # token reduction by resizing: 112x112 in pre-training
samples = 256_000_000      # 200 ImageNet-1K epochs
eps = 4 / 255              # PGD-1, step 4/255, eps 4/255
pgd_steps = 1
pgd_step_size = 4 / 255
eps_warmup = 0             # the paper does not warm up eps

# optimisation: MAE's supervised from-scratch ViT recipe (He et al. 2022, Table 11), which
# the paper says it "closely follows"; lr = base lr 1e-4 x batch / 256
batch_size = 4096
lr = 1e-4 * batch_size / 256
min_lr = 1e-6
warmup_samples = 20 * 1_281_167   # MAE: 20 warm-up epochs
weight_decay = 0.3                # MAE Table 11
beta1, beta2 = 0.9, 0.95          # MAE Table 11
grad_clip = 0.0                   # MAE: no clipping
ema_decay = 0.9999                # MAE Table 11
# augmentation: MAE Table 11 value by value, with timm's transforms as MAE's code builds them
# (main_finetune.py / util/datasets.py: timm create_transform and Mixup)
auto_augment = 'rand-m9-mstd0.5-inc1'  # MAE Table 11 "RandAug (9, 0.5)" = timm's string (MAE's --aa default)
mixup, cutmix = 0.8, 1.0          # MAE Table 11 (timm Mixup: prob 1.0, switch prob 0.5, per batch)
label_smoothing = 0.1             # MAE Table 11
reprob = 0.0                      # MAE Table 11 lists no random erasing
crop_scale = (0.08, 1.0)          # timm's RandomResizedCrop default (create_transform), ratio (3/4, 4/3)
train_interpolation = 'bilinear'  # paper Sec. 3.1: anti-aliased bilinear resizing (MAE's timm default: bicubic)
val_crop_pct = 0.9                # validation as the official AdvXL evaluation: resize int(S/0.9) bicubic,
val_interpolation = 'bicubic'     # then center crop S (eval_autoattack.py's default)

# bookkeeping
log_every = 409_600
eval_every = 12_800_000           # 10 epochs
eval_samples = 10_000
final_eval_samples = 0            # the whole 50k val set
ckpt_every = 6_400_000
# Each config sets, for its model: micro_batch_size and grad_ckpt, the largest micro batch that
# fits 8 x 80 GB GPUs with ~10% headroom and the least recomputation (`--dry_run=True` prints
# the plan); num_workers, loader workers per GPU = 1.2 x the GPU's training rate / one core's
# rate for the stage's input pipeline, at least 2 (docs/input-pipeline.md).
