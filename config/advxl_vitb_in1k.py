# AdvXL Table 2, row 1: ViT-B/16 pre-trained on ImageNet-1K, 256M samples at 112 px, PGD-1.
#   torchrun --nproc_per_node=8 train.py config/advxl_vitb_in1k.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/advxl_vitb_in1k
# Paper: 73.0 clean / 52.5 PGD-20 after fine-tuning; compute 0.5e10 GFLOPs (both stages).
# The other ImageNet rows start from this file and change what differs.
out_dir = 'out/advxl_vitb_in1k'
data = 'shards'                    # labelled shards, pre-resized: python make_shards.py /data/imagenet/train /data/imagenet-shards/train
train_data = '/data/imagenet-shards/train/shard-{000000..001281}.tar'   # (the pattern make_shards.py prints)
val_data = '/data/imagenet/val'
num_classes = 1000
model = 'vit_base_patch16'

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
drop_path_rate = 0.1              # MAE: 0.1 for ViT-B, 0.2 for ViT-L/H
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
num_workers = 13                  # loader workers per GPU: ~9,000 img/s per H100 / ~870 per core from shards, +20% (README, Input pipeline)
log_every = 409_600
eval_every = 12_800_000           # 10 epochs
eval_samples = 10_000
final_eval_samples = 0            # the whole 50k val set
ckpt_every = 6_400_000
# memory per GPU on 8 x 80 GB (`--dry_run=True` prints the plan): the largest micro batch that fits
# with ~10% headroom, with the least recomputation (activation checkpointing only where needed)
micro_batch_size = 512           # no accumulation at batch 4096: 10 GiB (ViT-L 28, ViT-H 59)
grad_ckpt = False
