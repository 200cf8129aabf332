# AdvXL Table 5's third stage for ViT-g/14: 6.4M samples at 336 px with PGD-3, after advxl_ft_in1k_vitg:
#   torchrun --nproc_per_node=8 train.py config/advxl_ft336_in1k_vitg.py
exec(open('config/advxl_ft336_in1k_vith.py').read())
out_dir = 'out/advxl_ft336_in1k_vitg'
init_from = 'out/advxl_ft_in1k_vitg'
model = 'vit_giant_patch14'
micro_batch_size = 32             # 54 GiB per GPU without checkpointing (dry run)
