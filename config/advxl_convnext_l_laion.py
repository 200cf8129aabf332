# AdvXL Table 3: ConvNeXt-L pre-trained on LAION-400M through the web-scale (contrastive)
# path with the same recipe as ViT-L/16 (2.56B@112 PGD-1), then fine-tuned on ImageNet-1K:
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/advxl_convnext_l_laion
# Paper: 77.9 clean / 58.5 PGD-20 (ViT-L/16: 80.5 / 62.2).
exec(open('config/advxl_vitl_laion.py').read())
out_dir = 'out/advxl_convnext_l_laion'
model = 'convnext_large'
num_workers = 6                      # loader workers per GPU: ~4,640 img/s per H100 / one core's rate (web recipe, shards at 112 px; README, Input pipeline)
