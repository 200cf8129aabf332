# AdvXL Table 2: ViT-L/16 on ImageNet-21K, the long schedule 789M@112 PGD-1
# (+ config/advxl_ft_in1k.py). Paper: 77.2 clean / 58.3 PGD-20; compute 3.4.
exec(open('config/advxl_vitl_in21k.py').read())
out_dir = 'out/advxl_vitl_in21k_long'
samples = 789_000_000
