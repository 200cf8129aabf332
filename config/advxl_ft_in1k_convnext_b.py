# AdvXL fine-tuning of a ConvNeXt-B (paper Table 3), after advxl_convnext_b_in1k:
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_convnext_b.py
exec(open('config/advxl_ft_in1k.py').read())
out_dir = 'out/advxl_ft_in1k_convnext_b'
init_from = 'out/advxl_convnext_b_in1k'
model = 'convnext_base'
drop_path_rate = 0.2              # ConvNeXt (Liu et al. 2022) fine-tuning: 0.2 for B (0.3 for L)
micro_batch_size = 128
num_workers = 6                      # loader workers per GPU: ~1,410 img/s per H100 / one core's rate (ImageFolder at 224 px; README, Input pipeline)
