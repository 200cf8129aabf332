# Base of the web-scale pre-training configs (paper Sec. 3.3 and Table 2's LAION-400M and
# DataComp-1B rows, Table 3's ConvNeXt-L, Table 4): image-text pairs, the contrastive loss
# against a frozen CLIPA text tower (Eq. 2-3), the AdvXL schedule of the LAION rows and the
# CLIPA recipe. A config starts from it with
#   extends('base_web_pretrain.py')
# and sets its model and text tower (with micro_batch_size, grad_ckpt, num_workers) and what
# else differs. A base extends nothing.
data = 'webdataset'
train_data = '/data/laion400m/{00000..41407}.tar'   # img2dataset layout: .jpg + .txt
val_data = '/data/imagenet/val'                      # zero-shot evaluation on labelled data
num_classes = 1000
text_pretrained = 'datacomp1b'    # the CLIPA text towers' open_clip tag

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
micro_batch_size = 1024           # 4 accumulation steps (each config sets its model's: memory per GPU)
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

# bookkeeping
log_every = 3_276_800
eval_every = 128_000_000
eval_samples = 10_000
final_eval_samples = 0
ckpt_every = 32_768_000
# Each config sets, for its model: micro_batch_size and grad_ckpt, the largest micro batch that
# fits 8 x 80 GB GPUs with ~10% headroom and the least recomputation (`--dry_run=True` prints
# the plan); num_workers, loader workers per GPU = 1.2 x the GPU's training rate / one core's
# rate for the stage's input pipeline, at least 2 (docs/input-pipeline.md).
