# AdvXL Table 3: ConvNeXt-B on ImageNet-1K with the same two-stage recipe as ViT-B/16
# (paper Sec. 4.4: "the same two-stage training recipe"): 256M@112 PGD-1, then
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/advxl_convnext_b_in1k
# Paper: 73.9 clean / 54.2 PGD-20 (ViT-B/16: 73.0 / 52.5). Token reduction is resizing only
# (masking is a ViT token operation); at 112 px the last stage's map is 3x3.
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/advxl_convnext_b_in1k'
model = 'convnext_base'
# drop_path_rate stays the ViT-B recipe's 0.1 (same recipe); ConvNeXt's own paper uses 0.5 for B
num_workers = 15                     # loader workers per GPU: ~10,400 img/s per H100 / one core's rate (shards at 112 px; README, Input pipeline)
