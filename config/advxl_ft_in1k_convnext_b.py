# AdvXL fine-tuning of a ConvNeXt-B (paper Table 3), after advxl_convnext_b_in1k, with the
# ViT-B/16 recipe (paper Sec. 4.4: "the same two-stage training recipe"):
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_convnext_b.py
extends('base_finetune.py')
out_dir = 'out/advxl_ft_in1k_convnext_b'
init_from = 'out/advxl_convnext_b_in1k'
model = 'convnext_base'
lr = 5e-4 * batch_size / 256      # ViT-B's (config/advxl_ft_in1k.py): the same recipe
drop_path_rate = 0.2              # ConvNeXt (Liu et al. 2022) fine-tuning: 0.2 for B (0.3 for L)
micro_batch_size = 128
grad_ckpt = False
num_workers = 6                   # loader workers per GPU (the base says how)
