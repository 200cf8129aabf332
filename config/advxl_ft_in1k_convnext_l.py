# AdvXL fine-tuning of a ConvNeXt-L (paper Table 3), after advxl_convnext_l_laion:
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_convnext_l.py
exec(open('config/advxl_ft_in1k.py').read())
out_dir = 'out/advxl_ft_in1k_convnext_l'
init_from = 'out/advxl_convnext_l_laion'
model = 'convnext_large'
drop_path_rate = 0.3              # ConvNeXt (Liu et al. 2022) fine-tuning: 0.3 for L
micro_batch_size = 128
num_workers = 3                      # loader workers per GPU: ~630 img/s per H100 / one core's rate (ImageFolder at 224 px; README, Input pipeline)
