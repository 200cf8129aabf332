# AdvXL Table 2: ViT-H/14 on ImageNet-21K, 789M@84 PGD-2 (+ config/advxl_ft_in1k.py).
# Paper: 79.0 clean / 60.5 PGD-20; compute 8.1.
exec(open('config/advxl_vitl_in21k_long.py').read())
out_dir = 'out/advxl_vith_in21k_long'
model = 'vit_huge_patch14'
img_size = 84                     # 6x6 patches of 14 px
pgd_steps = 2
pgd_step_size = 3 / 255           # paper Table 1b: step 3/255 with 2 steps
grad_ckpt = False                 # micro 512 fits without it: 39 GiB (dry run)
num_workers = 2                      # loader workers per GPU: ~1,190 img/s per H100 at 84 px / one core's rate (shards at 112 px; README, Input pipeline)
