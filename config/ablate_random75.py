# AdvXL Table 1a: random masking of 75% of the tokens. Paper 67.3 / 46.5.
# Pre-training only; fine-tune with config/advxl_ft_in1k.py --init_from=out/ablate_random75
# (resize 112 px is config/advxl_vitb_in1k.py itself).
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/ablate_random75'
img_size = 224
mask_ratio = 0.75
mask_kind = 'random'
