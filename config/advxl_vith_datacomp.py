# AdvXL Table 2, last row: ViT-H/14 pre-trained on DataComp-1B, 5.12B@84 PGD-2, then
# fine-tuned on ImageNet-1K (and at 336 px for Table 5). Paper: 83.3 clean / 68.2 PGD-20;
# compute 38.6 (39.6 with the 336 px stage).
#   torchrun --nproc_per_node=8 train.py config/advxl_vith_datacomp.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vith.py --init_from=out/advxl_vith_datacomp --out_dir=out/advxl_vith_datacomp_ft
#   torchrun --nproc_per_node=8 train.py config/advxl_ft336_in1k_vith.py --init_from=out/advxl_vith_datacomp_ft --out_dir=out/advxl_vith_datacomp_ft336
extends('base_web_pretrain.py')
out_dir = 'out/advxl_vith_datacomp'
train_data = '/data/datacomp1b/{00000000..00139827}.tar'
model = 'vit_huge_patch14'
text_tower = 'ViT-H-14-CLIPA'     # paper Sec. 4.4: the same-scale CLIPA text encoder
img_size = 84                     # 6x6 patches of 14 px
samples = 5_120_000_000
pgd_steps = 2
pgd_step_size = 3 / 255           # paper Table 1b: step 3/255 with 2 steps
micro_batch_size = 1024
grad_ckpt = False                 # micro 1024 fits 80 GB without it (docs/memory.md)
num_workers = 2                   # loader workers per GPU (the base says how)
