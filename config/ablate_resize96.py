# AdvXL Table 1a: resizing to 96 px. Paper 70.0 / 49.9.
# Pre-training only; fine-tune with config/advxl_ft_in1k.py --init_from=out/ablate_resize96
# (resize 112 px is config/advxl_vitb_in1k.py itself).
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/ablate_resize96'
img_size = 96
