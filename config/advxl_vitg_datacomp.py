# AdvXL Table 5: ViT-g/14 pre-trained on DataComp-1B, 5.12B@84 PGD-2, then
# config/advxl_ft_in1k_vitg.py and config/advxl_ft336_in1k_vitg.py. Paper: compute 63.4e10 GFLOPs;
# AutoAttack 83.9 clean, 71.0 l_inf, 70.4 l_2, 46.7 l_1.
exec(open('config/advxl_vith_datacomp.py').read())
out_dir = 'out/advxl_vitg_datacomp'
model = 'vit_giant_patch14'
text_tower = 'ViT-bigG-14-CLIPA'  # the largest CLIPA text tower for the largest image tower
micro_batch_size = 512            # 56 GiB without checkpointing (1024 would need it)
num_workers = 2                      # loader workers per GPU: ~740 img/s per H100 at 84 px / one core's rate (web recipe, shards at 84 px; README, Input pipeline)
