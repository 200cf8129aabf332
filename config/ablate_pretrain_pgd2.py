# AdvXL Table 1b: PGD-2 (step 3/255) in pre-training instead of PGD-1. Paper 72.1 / 52.6.
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/ablate_pretrain_pgd2'
pgd_steps = 2
pgd_step_size = 3 / 255
