# AdvXL Table 5's third stage for ViT-H/14: 6.4M samples at 336 px with PGD-3, after
# config/advxl_ft_in1k_vith.py (whose recipe it keeps but for the lines after img_size):
#   torchrun --nproc_per_node=8 train.py config/advxl_ft336_in1k_vith.py
extends('base_finetune.py')
out_dir = 'out/advxl_ft336_in1k_vith'
init_from = 'out/advxl_ft_in1k_vith'
model = 'vit_huge_patch14'
lr = 1e-3 * batch_size / 256      # MAE FINETUNE.md: base lr 1e-3 for ViT-H
drop_path_rate = 0.3              # MAE FINETUNE.md: 0.3 for ViT-H
img_size = 336
samples = 6_400_000
warmup_samples = 1_281_167        # 1 epoch: the run is only 5 epochs long
val_crop_pct = 0.9                # the official evaluation: resize int(336/0.9) bicubic, center crop 336
micro_batch_size = 64             # fits 80 GB without checkpointing (docs/memory.md)
grad_ckpt = False
num_workers = 2                   # loader workers per GPU (the base says how)
eval_every = 1_280_000
ckpt_every = 640_000
