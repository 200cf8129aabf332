# AdvXL Table 5's third stage for ViT-H/14: 6.4M samples at 336 px with PGD-3, after advxl_ft_in1k_vith:
#   torchrun --nproc_per_node=8 train.py config/advxl_ft336_in1k_vith.py --init_from=out/advxl_ft_in1k_vith
exec(open('config/advxl_ft_in1k_vith.py').read())
out_dir = 'out/advxl_ft336_in1k_vith'
init_from = 'out/advxl_ft_in1k_vith'
img_size = 336
samples = 6_400_000
warmup_samples = 1_281_167        # 1 epoch: the run is only 5 epochs long
val_crop_pct = 0.9                # the official evaluation: resize int(336/0.9) bicubic, center crop 336
micro_batch_size = 64             # 62 GiB per GPU without checkpointing (dry run)
eval_every = 1_280_000
ckpt_every = 640_000
