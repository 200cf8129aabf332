# The demo's one-stage control for the paper's central claim (bench.py's two_stage row):
# no token reduction: 32 px throughout, with the same attack (PGD-1) for the same 86k samples
# the two stages see (80k at 16 px, then 6k at 32 px).
#   python train.py config/demo_onestage.py
out_dir = 'out/demo_onestage'
img_size = 32
samples = 86000
final_eval_samples = 500
