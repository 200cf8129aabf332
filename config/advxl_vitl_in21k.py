# AdvXL Table 2: ViT-L/16 pre-trained on ImageNet-21K, 256M@112 PGD-1, then fine-tuned on
# ImageNet-1K. Paper: 75.8 clean / 56.1 PGD-20; compute 1.7 (both stages).
#   torchrun --nproc_per_node=8 train.py config/advxl_vitl_in21k.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vitl.py --init_from=out/advxl_vitl_in21k --out_dir=out/advxl_vitl_in21k_ft
extends('base_imagenet_pretrain.py')
out_dir = 'out/advxl_vitl_in21k'
train_data = '/data/imagenet21k-shards/train/shard-{000000..014197}.tar'  # make_shards.py (the usual .jpg + .cls)
val_data = '/data/imagenet21k/val'
num_classes = 21841               # the full fall11 release (use 19167 for the winter21 release)
model = 'vit_large_patch16'
drop_path_rate = 0.2              # MAE: 0.2 for ViT-L/H
micro_batch_size = 512            # no accumulation at batch 4096
grad_ckpt = False
num_workers = 4                   # loader workers per GPU (the base says how)
