# Exercise (paper Table 1a at toy scale): token reduction by block masking: stage 1 keeps
# one random 4x4 block of the 8x8 patch grid (16 tokens, as the 16 px default has).
#   python train.py config/demo_mask_block.py
#   python train.py config/demo_ft.py --init_from=out/demo_mask_block --out_dir=out/demo_mask_block_ft
out_dir = 'out/demo_mask_block'
img_size = 32
mask_ratio = 0.75
mask_kind = 'block'
