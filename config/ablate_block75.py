# AdvXL Table 1a: block masking keeping 25% of the tokens. Paper 70.6 / 49.3.
# Pre-training only; fine-tune with config/advxl_ft_in1k.py --init_from=out/ablate_block75
# (resize 112 px is config/advxl_vitb_in1k.py itself).
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/ablate_block75'
img_size = 224
mask_ratio = 0.75
mask_kind = 'block'
