# The demo's non-adversarial control: the same two stages and budget with no attack
# (pgd_steps = 0), to compare robustness side by side with the adversarial demo:
#   python train.py config/demo_plain.py && python train.py config/demo_ft.py config/demo_plain_ft.py
out_dir = 'out/demo_plain_pre'
pgd_steps = 0
