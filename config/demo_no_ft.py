# Exercise (paper Table 1c at toy scale): skip fine-tuning. Evaluates the 16 px stage-1 run
# at full resolution (32 px) without training it further (samples = 0).
#   python train.py config/demo_no_ft.py
exec(open('config/demo_ft.py').read())
out_dir = 'out/demo_no_ft'
samples = 0
