# AdvXL Table 2: ViT-L/16 on ImageNet-1K, 256M@112 PGD-1 (+ config/advxl_ft_in1k.py).
# Paper: 74.8 clean / 54.7 PGD-20; compute 1.7e10 GFLOPs.
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/advxl_vitl_in1k'
model = 'vit_large_patch16'
drop_path_rate = 0.2              # MAE: 0.2 for ViT-L/H
num_workers = 4                      # loader workers per GPU: ~2,550 img/s per H100 / one core's rate (shards at 112 px; README, Input pipeline)
