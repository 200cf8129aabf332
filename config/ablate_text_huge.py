# AdvXL Table 4: ViT-L/16 on LAION-400M with the Huge CLIPA text encoder (paper: 80.6 / 62.3),
# as config/advxl_vitl_laion.py but for the text tower.
#   torchrun --nproc_per_node=8 train.py config/ablate_text_huge.py
extends('base_web_pretrain.py')
out_dir = 'out/ablate_text_huge'
model = 'vit_large_patch16'
text_tower = 'ViT-H-14-CLIPA'
micro_batch_size = 1024
num_workers = 4                   # loader workers per GPU (the base says how)
