# AdvXL Table 1c: no fine-tuning. Evaluates a pre-trained run at full resolution without
# training it further (samples = 0). Paper: 112 px only gives 68.5 / 39.3, 160 px 74.4 / 43.2.
#   python train.py config/ablate_no_ft.py --init_from=out/advxl_vitb_in1k
exec(open('config/advxl_ft_in1k.py').read())
out_dir = 'out/ablate_no_ft'
samples = 0
