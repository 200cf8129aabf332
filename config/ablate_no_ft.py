# AdvXL Table 1c: no fine-tuning. Evaluates a ViT-B/16 pre-training run at full resolution
# (224 px) without training it further (samples = 0). Paper: 112 px only gives 68.5 / 39.3,
# 160 px 74.4 / 43.2:
#   python train.py config/ablate_no_ft.py --init_from=out/advxl_vitb_in1k
#   python train.py config/ablate_no_ft.py --init_from=out/ablate_resize160 --out_dir=out/ablate_no_ft160
extends('base_finetune.py')
out_dir = 'out/ablate_no_ft'
init_from = 'out/advxl_vitb_in1k'
model = 'vit_base_patch16'
samples = 0
lr = 5e-4 * batch_size / 256      # (no step is taken; the values of config/advxl_ft_in1k.py)
drop_path_rate = 0.1
micro_batch_size = 128
num_workers = 5                   # loader workers per GPU (the base says how)
