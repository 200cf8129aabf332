# AdvXL fine-tuning (paper Sec. 4.1): 38.4M samples (20 ImageNet-1K epochs) at 224 px with
# PGD-3, step 4/255, from any pre-training run (architecture read from the checkpoint):
#   torchrun --nproc_per_node=8 train.py config/advxl_ft_in1k.py --init_from=out/advxl_vitl_laion
# A web-trained tower gets its class head from the CLIP zero-shot classifier.
exec(open('config/advxl_vitb_in1k.py').read())
out_dir = 'out/advxl_ft_in1k'
init_from = 'out/advxl_vitb_in1k'
img_size = 224
samples = 38_400_000
pgd_steps = 3
pgd_step_size = 4 / 255
# MAE's end-to-end fine-tuning recipe (He et al. 2022, Table 9), without layer-wise decay
batch_size = 1024
lr = 1e-3 * batch_size / 256      # MAE: base lr 1e-3 (ViT-L/H; 5e-4 for ViT-B)
warmup_samples = 5 * 1_281_167    # MAE: 5 warm-up epochs
weight_decay = 0.05               # MAE Table 9
beta1, beta2 = 0.9, 0.999         # MAE Table 9
drop_path_rate = 0.2              # MAE: 0.1 for ViT-B, 0.2 for ViT-L/H
ema_decay = 0.0                   # MAE fine-tuning: no EMA
eval_every = 3_840_000
ckpt_every = 1_280_000
