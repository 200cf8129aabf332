# AdvXL Table 3: ConvNeXt-B on ImageNet-1K with the same two-stage recipe as ViT-B/16
# (paper Sec. 4.4: "the same two-stage training recipe"): 256M@112 PGD-1, then fine-tuning:
#   torchrun --nproc_per_node=8 train.py config/advxl_convnext_b_in1k.py
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k_convnext_b.py --init_from=out/advxl_convnext_b_in1k --out_dir=out/advxl_convnext_b_in1k_ft
# Paper: 73.9 clean / 54.2 PGD-20 (ViT-B/16: 73.0 / 52.5). Token reduction is resizing only
# (masking is a ViT token operation); at 112 px the last stage's map is 3x3.
extends('base_imagenet_pretrain.py')
out_dir = 'out/advxl_convnext_b_in1k'
model = 'convnext_base'
drop_path_rate = 0.1              # the ViT-B recipe's (same recipe); ConvNeXt's own paper uses 0.5 for B
micro_batch_size = 512            # no accumulation at batch 4096
grad_ckpt = False
num_workers = 15                  # loader workers per GPU (the base says how)
