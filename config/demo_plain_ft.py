# Second stage of config/demo_plain.py: give it after config/demo_ft.py.
out_dir = 'out/demo_plain_ft'
init_from = 'out/demo_plain_pre'
pgd_steps = 0
