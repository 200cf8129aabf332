# Exercise (paper Table 3 at toy scale): the demo's two-stage recipe with a small ConvNeXt
# instead of the ViT (stem stride 1, so its third stage sees the 8x8 grid the ViT's tokens
# do at 32 px). Token reduction is resizing only: masking is a ViT token operation.
#   python train.py config/demo_convnext.py
#   python train.py config/demo_ft.py --init_from=out/demo_convnext --model=convnext_demo --out_dir=out/demo_convnext_ft
out_dir = 'out/demo_convnext'
model = 'convnext_demo'
