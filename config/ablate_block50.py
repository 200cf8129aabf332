# AdvXL Table 1a: block masking keeping 50% of the tokens. Paper 72.3 / 52.0.
# The pre-training stage of ViT-B/16 on ImageNet-1K, as config/advxl_vitb_in1k.py (the 112 px
# resize row) but for the change below; the fine-tuning stage is the usual one:
#   torchrun --nproc_per_node=8 train.py config/ablate_block50.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/ablate_block50 --out_dir=out/ablate_block50_ft
extends('base_imagenet_pretrain.py')
out_dir = 'out/ablate_block50'
model = 'vit_base_patch16'
drop_path_rate = 0.1              # MAE: 0.1 for ViT-B
micro_batch_size = 512
num_workers = 13                  # loader workers per GPU (the base says how)
img_size = 224
mask_ratio = 0.5
mask_kind = 'block'
