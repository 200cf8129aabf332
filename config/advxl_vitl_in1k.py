# AdvXL Table 2: ViT-L/16 on ImageNet-1K, 256M@112 PGD-1. Paper: 74.8 clean / 54.7 PGD-20;
# compute 1.7e10 GFLOPs (both stages).
#   torchrun --nproc_per_node=8 train.py config/advxl_vitl_in1k.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vitl.py --init_from=out/advxl_vitl_in1k --out_dir=out/advxl_vitl_in1k_ft
extends('base_imagenet_pretrain.py')
out_dir = 'out/advxl_vitl_in1k'
model = 'vit_large_patch16'
drop_path_rate = 0.2              # MAE: 0.2 for ViT-L/H
micro_batch_size = 512            # no accumulation at batch 4096
grad_ckpt = False
num_workers = 4                   # loader workers per GPU (the base says how)
