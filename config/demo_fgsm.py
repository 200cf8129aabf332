# Exercise: single-step training WITHOUT a random start (plain FGSM, step = eps), the
# setting where catastrophic overfitting shows up (Wong et al. 2020): PGD-20 robustness
# collapses while the training-attack accuracy climbs. The default stage 1 is FGSM with a
# random start. Compare the two runs' logs: python plot.py out/demo_pre out/demo_fgsm
#   python train.py config/demo_fgsm.py
out_dir = 'out/demo_fgsm'
pgd_random_start = False
