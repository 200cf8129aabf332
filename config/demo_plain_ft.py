# Second stage of config/demo_plain.py (no attack): config/demo_ft.py's stage with pgd_steps = 0,
# from the plain first stage. Give it after config/demo_ft.py:
#   python train.py config/demo_ft.py config/demo_plain_ft.py
out_dir = 'out/demo_plain_ft'
init_from = 'out/demo_plain_pre'
pgd_steps = 0
