# AdvXL Table 1b: PGD-3 (step 3/255) in pre-training instead of PGD-1. Paper 71.8 / 52.5.
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/ablate_pretrain_pgd3'
pgd_steps = 3
pgd_step_size = 3 / 255
