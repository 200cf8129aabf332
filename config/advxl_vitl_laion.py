# AdvXL Table 2: ViT-L/16 pre-trained on LAION-400M image-text pairs, 2.56B@112 PGD-1, with
# the contrastive loss against a frozen CLIPA text tower (paper Sec. 3.3, Eq. 2-3), then
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/advxl_vitl_laion
# Paper: 80.5 clean / 62.2 PGD-20 after fine-tuning; compute 8.8e10 GFLOPs.
out_dir = 'out/advxl_vitl_laion'
data = 'webdataset'
train_data = '/data/laion400m/{00000..41407}.tar'   # img2dataset layout: .jpg + .txt
val_data = '/data/imagenet/val'                      # zero-shot evaluation on labelled data
num_classes = 1000
model = 'vit_large_patch16'
text_tower = 'ViT-L-14-CLIPA'     # paper Sec. 4.4: the same-scale CLIPA text encoder
text_pretrained = 'datacomp1b'

# the AdvXL schedule (paper Table 2)
img_size = 112
samples = 2_560_000_000
eps = 4 / 255
pgd_steps = 1
pgd_step_size = 4 / 255
eps_warmup = 0

# optimisation: the CLIPA recipe (Li et al. 2023, which follows FLIP), as the paper says;
# lr = base lr 8e-6 x batch / 256
batch_size = 32768
lr = 8e-6 * batch_size / 256
min_lr = 0.0
warmup_samples = 1600 * 32768     # CLIPA: 1600 warm-up steps
weight_decay = 0.2                # CLIPA / CLIP
beta1, beta2 = 0.9, 0.95          # CLIPA / FLIP
grad_clip = 0.0
logit_scale_init = 1 / 0.07       # CLIP's temperature initialisation
label_smoothing = 0.0             # contrastive loss: no labels to smooth
mixup, cutmix = 0.0, 0.0          # CLIPA / FLIP: no MixUp / CutMix
auto_augment = ''                 # CLIPA / FLIP: no RandAugment
reprob = 0.0
crop_scale = (0.9, 1.0)           # light augmentation for web data (open_clip's RandomResizedCrop scale)
train_interpolation = 'bilinear'  # paper Sec. 3.1: anti-aliased bilinear resizing
drop_path_rate = 0.0
ema_decay = 0.0
val_crop_pct = 0.9                # zero-shot validation as the official AdvXL evaluation (eval_autoattack.py)
val_interpolation = 'bicubic'

num_workers = 4                   # loader workers per GPU: ~2,550 img/s per H100 / one core's rate (web recipe, shards at 112 px; README, Input pipeline)
log_every = 3_276_800
eval_every = 128_000_000
eval_samples = 10_000
final_eval_samples = 0
ckpt_every = 32_768_000
# memory per GPU on 8 x 80 GB (`--dry_run=True` prints the plan): the largest micro batch that fits
# with ~10% headroom, with the least recomputation (activation checkpointing only where needed)
micro_batch_size = 1024          # 4 accumulation steps at batch 32768: 48 GiB (2048: over 72)
grad_ckpt = False
