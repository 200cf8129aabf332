# Exercise (paper Table 1c at toy scale): skip fine-tuning. Evaluates the 16 px stage-1 run
# at full resolution (32 px) without training it further: config/demo_ft.py's stage with no
# training step (samples = 0), so no optimiser or attack setting matters here.
#   python train.py config/demo_no_ft.py
out_dir = 'out/demo_no_ft'
init_from = 'out/demo_pre'
img_size = 32
samples = 0
final_eval_samples = 500
