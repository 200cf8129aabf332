# AdvXL fine-tuning (paper Sec. 4.1) of a ViT-B/16: 38.4M samples (20 ImageNet-1K epochs) at
# 224 px with PGD-3, step 4/255, from a pre-training run:
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/advxl_vitb_in1k
# Other models have their own file (their recipe and memory differ), e.g.
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vitl.py --init_from=out/advxl_vitl_laion
# (_vitl, _vith, _vitg, _convnext_b, _convnext_l). A web-trained tower gets its class head from
# the CLIP zero-shot classifier.
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/advxl_ft_in1k'
init_from = 'out/advxl_vitb_in1k'
img_size = 224
samples = 38_400_000
pgd_steps = 3
pgd_step_size = 4 / 255
# MAE's end-to-end fine-tuning recipe (He et al. 2022, Table 9), without layer-wise decay
batch_size = 1024
lr = 5e-4 * batch_size / 256      # MAE FINETUNE.md: base lr 5e-4 for ViT-B (1e-3 for ViT-L/H)
warmup_samples = 5 * 1_281_167    # MAE: 5 warm-up epochs
weight_decay = 0.05               # MAE Table 9
beta1, beta2 = 0.9, 0.999         # MAE Table 9
drop_path_rate = 0.1              # MAE FINETUNE.md: 0.1 for ViT-B (0.2 ViT-L, 0.3 ViT-H)
# augmentation: MAE fine-tuning (Table 9; main_finetune.py's defaults and FINETUNE.md's command)
auto_augment = 'rand-m9-mstd0.5-inc1'  # MAE Table 9 "RandAug (9, 0.5)" (--aa rand-m9-mstd0.5-inc1)
mixup, cutmix = 0.8, 1.0          # MAE Table 9 (--mixup 0.8 --cutmix 1.0)
label_smoothing = 0.1             # MAE Table 9 (--smoothing 0.1)
reprob = 0.25                     # MAE fine-tuning: random erasing 0.25, mode 'pixel', 1 box (--reprob 0.25)
data = 'imagefolder'              # full-resolution originals at 224 / 336 px
train_data = '/data/imagenet/train'
ema_decay = 0.0                   # MAE fine-tuning: no EMA
num_workers = 5                   # loader workers per GPU (ViT-B): ~1,230 img/s per H100 / ~330 per core (ImageFolder at 224 px; README)
eval_every = 3_840_000
ckpt_every = 1_280_000
# memory per GPU on 8 x 80 GB (`--dry_run=True` prints the plan): the largest micro batch that fits
# with ~10% headroom, with the least recomputation (activation checkpointing only where needed)
micro_batch_size = 128
grad_ckpt = False
