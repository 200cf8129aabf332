# Base of the CLIP-style demo (config/demo_clip.py, config/demo_clip_plain.py): the demo's
# webdataset shards (image + caption; the .cls label in the shards is never read on this path),
# a FROZEN, randomly initialised tiny text tower, and ZERO-SHOT clean / PGD-20 accuracy on the
# labelled val set. A config starts from it with
#   extends('base_demo_clip.py')
# and sets its out_dir and attack. A base extends nothing.
#
# A random text tower knows no language: a caption's embedding is a fixed random function of
# its tokens, and captions and prompts only meet where they share words and grammar. So:
# - Captions (demo_data.render) are short and lead with the object, like a stock-photo alt text:
#   "star: a small red star on stripes". In "a photo of a small red star on a striped
#   background" the shape is 1 token of 13 and two captions differing only in shape have
#   cosine ~0.98: even a perfect image tower (its embedding = the caption's) classifies only
#   44% of the 720 caption kinds with the prompt ensemble below (text-to-text zero-shot);
#   with the short captions it is 100% over 4 text-tower seeds (same-attributes/other-shape
#   cosine ~0.75-0.85). Size, colour and background stay in the caption, so the image tower
#   must still match all of them, as CLIP does with real alt text.
# - Prompts are the caption grammar with the class name in, ensembled over every attribute
#   value (2 sizes x 9 colours x 4 backgrounds = 72 templates), as CLIP's 80 templates mirror
#   the web's alt text ("a photo of a small {}", ...). The class weight is a fixed function of
#   the class name alone (the mean over the attribute values it does not know); no val image's
#   caption or label goes into it.
data = 'webdataset'
train_data = 'data_cache/demo/shards/train-{0000..0011}.tar'   # 12k image-caption pairs
val_data = 'data_cache/demo/val'                               # labelled ImageFolder, class = folder
text_tower = 'tiny-text-w256'   # assets/open_clip: width 256, 4 heads, 2 layers, 256-d output
text_pretrained = ''            # random init from `seed`. Wider than tiny-text (64): random
                                # embeddings are less collapsed (text-to-text zero-shot of the
                                # long captions 0.90-0.97 at 256 vs 0.45-0.85 at 64, over seeds)
prompt_templates = tuple(f"{{}}: a {_s} {_c} {{}} on {_b}"
                         for _s in ('small', 'large')
                         for _c in ('red', 'orange', 'yellow', 'green', 'cyan', 'blue', 'purple', 'pink', 'white')
                         for _b in ('stripes', 'checks', 'dots', 'noise'))
logit_scale_init = 50.0         # caption embeddings still share a lot (cosine ~0.5-0.9), so the
                                # differences that matter are ~0.1-0.3: start sharper than 1/0.07
                                # (it is learnable, clamped at 100)
# budget: ~4.3 ms of CPU per sample all-in on one thread (measured: 40k samples + 500-image eval
# = 176 s CPU), so 60k samples is ~4-5 min of CPU; < 10 min on 2 idle cores with room to spare
samples = 60000
warmup_samples = 2000
eps_warmup = 10000              # eps 0 -> 8/255 over the first 10k samples (PGD-1, step = eps)
final_eval_samples = 500        # zero-shot clean and PGD-20 (step 1/255) on 500 val images
log_every = 4000
