# AdvXL Table 2: ViT-L/16 pre-trained on ImageNet-21K, 256M@112 PGD-1, then fine-tuned on
# ImageNet-1K with config/advxl_ft_in1k.py. Paper: 75.8 clean / 56.1 PGD-20; compute 1.7.
exec(open('config/advxl_vitl_in1k.py').read())
out_dir = 'out/advxl_vitl_in21k'
train_data = '/data/imagenet21k-shards/train/shard-{000000..014197}.tar'  # make_shards.py (the usual .jpg + .cls)
val_data = '/data/imagenet21k/val'
num_classes = 21841               # the full fall11 release (use 19167 for the winter21 release)
