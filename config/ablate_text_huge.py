# AdvXL Table 4: ViT-L/16 on LAION-400M with the Huge CLIPA text encoder (paper: 80.6 / 62.3).
exec(open('config/advxl_vitl_laion.py').read())
out_dir = 'out/ablate_text_huge'
text_tower = 'ViT-H-14-CLIPA'
