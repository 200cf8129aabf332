# AdvXL fine-tuning of a ViT-L/16 (paper Table 2, rows ViT-L), after advxl_vitl_in1k / _in21k / _in21k_long / _laion:
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vitl.py --init_from=out/advxl_vitl_laion --out_dir=out/advxl_vitl_laion_ft
extends('base_finetune.py')
out_dir = 'out/advxl_ft_in1k_vitl'
init_from = 'out/advxl_vitl_in1k'
model = 'vit_large_patch16'
lr = 1e-3 * batch_size / 256      # MAE FINETUNE.md: base lr 1e-3 for ViT-L
drop_path_rate = 0.2              # MAE FINETUNE.md: 0.2 for ViT-L
micro_batch_size = 128            # fits 80 GB without checkpointing (docs/memory.md)
grad_ckpt = False
num_workers = 2                   # loader workers per GPU (the base says how)
