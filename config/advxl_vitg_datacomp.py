# AdvXL Table 5: ViT-g/14 pre-trained on DataComp-1B, 5.12B@84 PGD-2, then
# config/advxl_ft_in1k.py and config/advxl_ft336_in1k.py. Paper: compute 63.4e10 GFLOPs;
# AutoAttack 83.9 clean, 71.0 l_inf, 70.4 l_2, 46.7 l_1.
exec(open('config/advxl_vith_datacomp.py').read())
out_dir = 'out/advxl_vitg_datacomp'
model = 'vit_giant_patch14'
text_tower = 'ViT-bigG-14-CLIPA'  # the largest CLIPA text tower for the largest image tower
