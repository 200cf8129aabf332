# AdvXL Table 1b: PGD-2 (step 4/255) in fine-tuning instead of PGD-3. Paper 73.2 / 52.3.
exec(open('config/advxl_ft_in1k.py').read())
out_dir = 'out/ablate_ft_pgd2'
pgd_steps = 2
