# AdvXL Table 2, last row: ViT-H/14 pre-trained on DataComp-1B, 5.12B@84 PGD-2, then
# config/advxl_ft_in1k_vith.py (and config/advxl_ft336_in1k_vith.py for Table 5).
# Paper: 83.3 clean / 68.2 PGD-20; compute 38.6 (39.6 with the 336 px stage).
exec(open('config/advxl_vitl_laion.py').read())
out_dir = 'out/advxl_vith_datacomp'
train_data = '/data/datacomp1b/{00000000..00139827}.tar'
model = 'vit_huge_patch14'
text_tower = 'ViT-H-14-CLIPA'     # paper Sec. 4.4: the same-scale CLIPA text encoder
img_size = 84                     # 6x6 patches of 14 px
samples = 5_120_000_000
pgd_steps = 2
pgd_step_size = 3 / 255           # paper Table 1b: step 3/255 with 2 steps
grad_ckpt = False                 # micro 1024 fits without it: 64 GiB (dry run)
num_workers = 2                      # loader workers per GPU: ~1,190 img/s per H100 at 84 px / one core's rate (web recipe, shards at 84 px; README, Input pipeline)
