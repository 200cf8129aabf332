# AdvXL fine-tuning of a ViT-H/14 (paper Table 2, rows ViT-H), after advxl_vith_in1k / _in21k_long / _datacomp:
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vith.py --init_from=out/advxl_vith_datacomp --out_dir=out/advxl_vith_datacomp_ft
extends('base_finetune.py')
out_dir = 'out/advxl_ft_in1k_vith'
init_from = 'out/advxl_vith_in1k'
model = 'vit_huge_patch14'
lr = 1e-3 * batch_size / 256      # MAE FINETUNE.md: base lr 1e-3 for ViT-H
drop_path_rate = 0.3              # MAE FINETUNE.md: 0.3 for ViT-H
micro_batch_size = 128            # fits 80 GB without checkpointing (docs/memory.md)
grad_ckpt = False
num_workers = 2                   # loader workers per GPU (the base says how)
