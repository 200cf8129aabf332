# AdvXL Table 1b: PGD-2 (step 4/255) in fine-tuning instead of PGD-3. Paper 73.2 / 52.3.
# The ViT-B/16 fine-tuning stage of config/advxl_ft_in1k.py (from out/advxl_vitb_in1k) but for
# the attack's steps:
#   torchrun --nproc_per_node=8 train.py config/ablate_ft_pgd2.py
extends('base_finetune.py')
out_dir = 'out/ablate_ft_pgd2'
init_from = 'out/advxl_vitb_in1k'
model = 'vit_base_patch16'
lr = 5e-4 * batch_size / 256      # MAE FINETUNE.md: base lr 5e-4 for ViT-B
drop_path_rate = 0.1              # MAE FINETUNE.md: 0.1 for ViT-B
micro_batch_size = 128
num_workers = 5                   # loader workers per GPU (the base says how)
pgd_steps = 2
