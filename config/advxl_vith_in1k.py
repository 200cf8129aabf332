# AdvXL Table 2: ViT-H/14 on ImageNet-1K, 256M@112 PGD-2. Paper: 76.5 clean / 54.9 PGD-20;
# compute 5.7e10 GFLOPs (both stages).
#   torchrun --nproc_per_node=8 train.py config/advxl_vith_in1k.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vith.py --init_from=out/advxl_vith_in1k --out_dir=out/advxl_vith_in1k_ft
extends('base_imagenet_pretrain.py')
out_dir = 'out/advxl_vith_in1k'
model = 'vit_huge_patch14'
drop_path_rate = 0.2              # MAE: 0.2 for ViT-L/H
pgd_steps = 2                     # paper Table 2: PGD-2 in pre-training for ViT-H
pgd_step_size = 3 / 255           # paper Table 1b: step 3/255 with 2 steps
micro_batch_size = 512
grad_ckpt = False                 # micro 512 fits 80 GB without it (docs/memory.md)
num_workers = 2                   # loader workers per GPU (the base says how)
