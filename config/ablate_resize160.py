# AdvXL Table 1a: resizing to 160 px. Paper 74.7 / 53.9.
# Pre-training only; fine-tune with config/advxl_ft_in1k.py --init_from=out/ablate_resize160
# (resize 112 px is config/advxl_vitb_in1k.py itself).
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/ablate_resize160'
img_size = 160
