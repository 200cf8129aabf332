# Exercise (paper Table 1a at toy scale): token reduction by random masking instead of
# resizing. Stage 1 sees full 32 px images and keeps a random 25% of the 64 patch tokens
# (16, as many as the 16 px default has), so the compute per sample is the same.
#   python train.py config/demo_mask_random.py
#   python train.py config/demo_ft.py --init_from=out/demo_mask_random --out_dir=out/demo_mask_random_ft
out_dir = 'out/demo_mask_random'
img_size = 32
mask_ratio = 0.75
mask_kind = 'random'
