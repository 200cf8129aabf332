# The CLIP-style demo with BOTH towers trained from scratch (joint adversarial CLIP pre-training,
# after Double Visual Defense / ΔCLIP, Wang et al. 2025): the same shards, budget and attack as
# config/demo_clip.py, but the tiny text tower (random init) trains with the image tower on the
# contrastive loss; the attack perturbs images only. Zero-shot clean / PGD-20 accuracy on the
# labelled val set uses the text tower as trained. CPU, a few minutes:
#   python train.py config/demo_clip_joint.py
extends('base_demo_clip.py')
out_dir = 'out/demo_clip_joint'
train_text_tower = True
