# AdvXL fine-tuning of a ConvNeXt-L (paper Table 3), after advxl_convnext_l_laion, with the
# ViT-B/16 fine-tuning recipe but for drop path:
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_convnext_l.py
extends('base_finetune.py')
out_dir = 'out/advxl_ft_in1k_convnext_l'
init_from = 'out/advxl_convnext_l_laion'
model = 'convnext_large'
lr = 5e-4 * batch_size / 256      # ViT-B's (config/advxl_ft_in1k.py)
drop_path_rate = 0.3              # ConvNeXt (Liu et al. 2022) fine-tuning: 0.3 for L
micro_batch_size = 128
grad_ckpt = False
num_workers = 3                   # loader workers per GPU (the base says how)
