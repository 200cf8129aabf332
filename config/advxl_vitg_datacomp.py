# AdvXL Table 5: ViT-g/14 pre-trained on DataComp-1B, 5.12B@84 PGD-2, then two fine-tuning
# stages. Paper: compute 63.4e10 GFLOPs; AutoAttack 83.9 clean, 71.0 l_inf, 70.4 l_2, 46.7 l_1.
#   torchrun --nproc_per_node=8 train.py config/advxl_vitg_datacomp.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vitg.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft336_in1k_vitg.py
extends('base_web_pretrain.py')
out_dir = 'out/advxl_vitg_datacomp'
train_data = '/data/datacomp1b/{00000000..00139827}.tar'
model = 'vit_giant_patch14'
text_tower = 'ViT-bigG-14-CLIPA'  # the largest CLIPA text tower for the largest image tower
img_size = 84                     # 6x6 patches of 14 px
samples = 5_120_000_000
pgd_steps = 2
pgd_step_size = 3 / 255           # paper Table 1b: step 3/255 with 2 steps (as ViT-H)
micro_batch_size = 512            # fits 80 GB without checkpointing (1024 would need it)
grad_ckpt = False
num_workers = 2                   # loader workers per GPU (the base says how)
