# AdvXL Table 2: ViT-L/16 pre-trained on LAION-400M image-text pairs, 2.56B@112 PGD-1, with
# the contrastive loss against a frozen CLIPA text tower (paper Sec. 3.3, Eq. 2-3), then
# fine-tuned on ImageNet-1K. Paper: 80.5 clean / 62.2 PGD-20; compute 8.8e10 GFLOPs (both stages).
#   torchrun --nproc_per_node=8 train.py config/advxl_vitl_laion.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vitl.py --init_from=out/advxl_vitl_laion --out_dir=out/advxl_vitl_laion_ft
extends('base_web_pretrain.py')
out_dir = 'out/advxl_vitl_laion'
model = 'vit_large_patch16'
text_tower = 'ViT-L-14-CLIPA'     # paper Sec. 4.4: the same-scale CLIPA text encoder
micro_batch_size = 1024           # 4 accumulation steps at batch 32768 (2048 would not fit 80 GB)
grad_ckpt = False
num_workers = 4                   # loader workers per GPU (the base says how)
