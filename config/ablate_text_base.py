# AdvXL Table 4: ViT-L/16 on LAION-400M with a Base-size text encoder (paper: 80.6 / 62.2),
# as config/advxl_vitl_laion.py but for the text tower. open_clip ships no Base CLIPA tower;
# the closest Base-size text tower trained on DataComp is used.
#   torchrun --nproc_per_node=8 train.py config/ablate_text_base.py
extends('base_web_pretrain.py')
out_dir = 'out/ablate_text_base'
model = 'vit_large_patch16'
text_tower = 'ViT-B-16'
text_pretrained = 'datacomp_xl_s13b_b90k'
micro_batch_size = 1024
num_workers = 4                   # loader workers per GPU (the base says how)
