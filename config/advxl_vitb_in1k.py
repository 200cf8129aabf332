# AdvXL Table 2, row 1: ViT-B/16 pre-trained on ImageNet-1K, 256M samples at 112 px, PGD-1.
#   torchrun --nproc_per_node=8 train.py config/advxl_vitb_in1k.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/advxl_vitb_in1k
# Paper: 73.0 clean / 52.5 PGD-20 after fine-tuning; compute 0.5e10 GFLOPs (both stages).
# The other ImageNet rows start from this file and change what differs.
out_dir = 'out/advxl_vitb_in1k'
data = 'imagefolder'
train_data = '/data/imagenet/train'
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
label_smoothing = 0.1             # MAE
mixup, cutmix = 0.8, 1.0          # MAE
randaug_n, randaug_m = 2, 9       # MAE: RandAug(9, 0.5)
crop_scale = (0.08, 1.0)          # Inception-style RandomResizedCrop
val_crop_pct = 0.875

# bookkeeping
num_workers = 10
log_every = 409_600
eval_every = 12_800_000           # 10 epochs
eval_samples = 10_000
final_eval_samples = 0            # the whole 50k val set
ckpt_every = 6_400_000
