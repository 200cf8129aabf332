# AdvXL Table 1b: PGD-1 (step 4/255) in fine-tuning instead of PGD-3. Paper 75.0 / 50.6.
exec(open('config/advxl_ft_in1k.py').read())
out_dir = 'out/ablate_ft_pgd1'
pgd_steps = 1
