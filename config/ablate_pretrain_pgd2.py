# AdvXL Table 1b: PGD-2 (step 3/255) in pre-training instead of PGD-1. Paper 72.1 / 52.6.
# The pre-training stage of ViT-B/16 on ImageNet-1K, as config/advxl_vitb_in1k.py but for the
# change below; the fine-tuning stage is the usual one:
#   torchrun --nproc_per_node=8 train.py config/ablate_pretrain_pgd2.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/ablate_pretrain_pgd2 --out_dir=out/ablate_pretrain_pgd2_ft
extends('base_imagenet_pretrain.py')
out_dir = 'out/ablate_pretrain_pgd2'
model = 'vit_base_patch16'
drop_path_rate = 0.1              # MAE: 0.1 for ViT-B
micro_batch_size = 512
num_workers = 13                  # loader workers per GPU (the base says how)
pgd_steps = 2
pgd_step_size = 3 / 255
