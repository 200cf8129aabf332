# AdvXL Table 1a baseline: no token reduction (224 px). Paper 75.5 / 54.5.
# The pre-training stage of ViT-B/16 on ImageNet-1K, as config/advxl_vitb_in1k.py (the 112 px
# resize row) but for the change below; the fine-tuning stage is the usual one:
#   torchrun --nproc_per_node=8 train.py config/ablate_baseline224.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/ablate_baseline224 --out_dir=out/ablate_baseline224_ft
extends('base_imagenet_pretrain.py')
out_dir = 'out/ablate_baseline224'
model = 'vit_base_patch16'
drop_path_rate = 0.1              # MAE: 0.1 for ViT-B
micro_batch_size = 512
num_workers = 13                  # loader workers per GPU (the base says how)
img_size = 224
