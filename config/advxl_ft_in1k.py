# AdvXL fine-tuning (paper Sec. 4.1) of a ViT-B/16: 38.4M samples (20 ImageNet-1K epochs) at
# 224 px with PGD-3, step 4/255, from a ViT-B/16 pre-training run (advxl_vitb_in1k, Table 1's ablations):
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/advxl_vitb_in1k --out_dir=out/advxl_vitb_in1k_ft
# Every other model has its own file (its recipe and memory differ):
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_vitl.py --init_from=out/advxl_vitl_laion --out_dir=out/advxl_vitl_laion_ft
# (_vitl, _vith, _vitg, _convnext_b, _convnext_l).
extends('base_finetune.py')
out_dir = 'out/advxl_ft_in1k'
init_from = 'out/advxl_vitb_in1k'
model = 'vit_base_patch16'
lr = 5e-4 * batch_size / 256      # MAE FINETUNE.md: base lr 5e-4 for ViT-B (1e-3 for ViT-L/H)
drop_path_rate = 0.1              # MAE FINETUNE.md: 0.1 for ViT-B (0.2 ViT-L, 0.3 ViT-H)
micro_batch_size = 128
grad_ckpt = False
num_workers = 5                   # loader workers per GPU (the base says how)
