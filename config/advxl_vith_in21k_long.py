# AdvXL Table 2: ViT-H/14 on ImageNet-21K, 789M@84 PGD-2, then fine-tuned on ImageNet-1K.
# Paper: 79.0 clean / 60.5 PGD-20; compute 8.1 (both stages).
#   torchrun --nproc_per_node=8 train.py config/advxl_vith_in21k_long.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vith.py --init_from=out/advxl_vith_in21k_long --out_dir=out/advxl_vith_in21k_long_ft
extends('base_imagenet_pretrain.py')
out_dir = 'out/advxl_vith_in21k_long'
train_data = '/data/imagenet21k-shards/train/shard-{000000..014197}.tar'  # make_shards.py (the usual .jpg + .cls)
val_data = '/data/imagenet21k/val'
num_classes = 21841               # the full fall11 release (use 19167 for the winter21 release)
samples = 789_000_000
img_size = 84                     # 6x6 patches of 14 px
model = 'vit_huge_patch14'
drop_path_rate = 0.2              # MAE: 0.2 for ViT-L/H
pgd_steps = 2
pgd_step_size = 3 / 255           # paper Table 1b: step 3/255 with 2 steps
micro_batch_size = 512
grad_ckpt = False                 # micro 512 fits 80 GB without it (docs/memory.md)
num_workers = 2                   # loader workers per GPU (the base says how)
