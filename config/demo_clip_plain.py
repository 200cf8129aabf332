# The robust-CLIP demo's starting point: config/demo_clip.py without the attack (eps 0), a plain
# contrastive image tower, as a pretrained open_clip model is. Then FARE or TeCoA make it robust:
#   python train.py config/demo_clip_plain.py
#   python train.py config/demo_fare.py      # and/or config/demo_tecoa.py
extends('base_demo_clip.py')
out_dir = 'out/demo_clip_plain'
eps = 0.0
eval_eps = 8 / 255                # evaluated at the demo's radius all the same
