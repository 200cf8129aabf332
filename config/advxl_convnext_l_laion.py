# AdvXL Table 3: ConvNeXt-L pre-trained on LAION-400M through the web-scale (contrastive)
# path with the same recipe as ViT-L/16 (2.56B@112 PGD-1), then fine-tuned on ImageNet-1K:
#   torchrun --nproc_per_node=8 train.py config/advxl_convnext_l_laion.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_convnext_l.py --init_from=out/advxl_convnext_l_laion --out_dir=out/advxl_convnext_l_laion_ft
# Paper: 77.9 clean / 58.5 PGD-20 (ViT-L/16: 80.5 / 62.2).
extends('base_web_pretrain.py')
out_dir = 'out/advxl_convnext_l_laion'
model = 'convnext_large'
text_tower = 'ViT-L-14-CLIPA'     # ViT-L/16's (config/advxl_vitl_laion.py): the same recipe
micro_batch_size = 1024           # 4 accumulation steps at batch 32768
grad_ckpt = False
num_workers = 6                   # loader workers per GPU (the base says how)
