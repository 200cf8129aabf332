# The embedded demo, CLIP-style (Sec. 3.3 in miniature): contrastive adversarial pre-training
# of the image tower on the demo's image-caption shards against a frozen, randomly initialised
# tiny text tower, then zero-shot clean / PGD-20 accuracy on the labelled val set (the base
# says why the captions and prompts are what they are). CPU, a few minutes:
#   python train.py config/demo_clip.py
extends('base_demo_clip.py')
out_dir = 'out/demo_clip'
