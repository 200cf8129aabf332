# AdvXL Table 1a baseline: no token reduction (224 px). Paper 75.5 / 54.5.
# Pre-training only; fine-tune with config/advxl_ft_in1k.py --init_from=out/ablate_baseline224
# (resize 112 px is config/advxl_vitb_in1k.py itself).
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/ablate_baseline224'
img_size = 224
