# AdvXL Table 4: ViT-L/16 on LAION-400M with a Base-size text encoder (paper: 80.6 / 62.2).
# open_clip ships no Base CLIPA tower; the closest Base-size text tower trained on DataComp is used.
exec(open('config/advxl_vitl_laion.py').read())
out_dir = 'out/ablate_text_base'
text_tower = 'ViT-B-16'
text_pretrained = 'datacomp_xl_s13b_b90k'
