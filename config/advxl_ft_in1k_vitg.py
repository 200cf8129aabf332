# AdvXL fine-tuning of a ViT-g/14 (paper Table 5), after advxl_vitg_datacomp, before advxl_ft336_in1k_vitg:
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vitg.py --init_from=out/advxl_vitg_datacomp --out_dir=out/advxl_vitg_datacomp_ft
extends('base_finetune.py')
out_dir = 'out/advxl_ft_in1k_vitg'
init_from = 'out/advxl_vitg_datacomp'
model = 'vit_giant_patch14'
lr = 1e-3 * batch_size / 256      # MAE has no ViT-g: ViT-H's values (FINETUNE.md)
drop_path_rate = 0.3
micro_batch_size = 64             # fits 80 GB without checkpointing; 128 does not
grad_ckpt = False
num_workers = 2                   # loader workers per GPU (the base says how)
