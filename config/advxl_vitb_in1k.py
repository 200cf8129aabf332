# AdvXL Table 2, row 1: ViT-B/16 pre-trained on ImageNet-1K, 256M samples at 112 px, PGD-1.
#   torchrun --nproc_per_node=8 train.py config/advxl_vitb_in1k.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/advxl_vitb_in1k --out_dir=out/advxl_vitb_in1k_ft
# Paper: 73.0 clean / 52.5 PGD-20 after fine-tuning; compute 0.5e10 GFLOPs (both stages).
extends('base_imagenet_pretrain.py')
out_dir = 'out/advxl_vitb_in1k'
model = 'vit_base_patch16'
drop_path_rate = 0.1              # MAE: 0.1 for ViT-B, 0.2 for ViT-L/H
micro_batch_size = 512            # no accumulation at batch 4096 (docs/memory.md)
grad_ckpt = False
num_workers = 13                  # loader workers per GPU (the base says how)
