# Third stage of config/advclip_vith14_datacomp.py (joint adversarial CLIP after Double Visual
# Defense, arXiv 2501.09446): both towers at 336 px, the resolution of the released
# DeltaCLIP-H/14 (huggingface.co/zw123/delta_clip_h14_336). The paper's stored sources do not
# give this stage's schedule; it is CLIPA-v2's H/14 336 px fine-tuning (UCSC-VLAA/CLIPA
# clipa_jax/configs/model_h/unmask_tuning_336_scheduleX1.py) with AdvXL's fine-tuning attack
# (Sec. 4.1, Table 5's 336 px stage: PGD-3, step 4/255). Sources: docs/joint-clip.md.
#   torchrun --nproc_per_node=8 train.py config/advclip_ft336_vith14_datacomp.py --init_from=out/advclip_ft_vith14_datacomp --out_dir=out/advclip_ft336_vith14_datacomp
extends('base_web_pretrain.py')
out_dir = 'out/advclip_ft336_vith14_datacomp'
init_from = 'out/advclip_ft_vith14_datacomp'
train_data = '/data/datacomp1b/{00000000..00139827}.tar'  # as the first stage (model cards: DataComp-1B, Recap-DataComp-1B)
model = 'vit_huge_patch14'        # as the first stage
train_text_tower = True           # as the first stage: both towers train
text_tower = 'ViT-H-14-CLIPA'     # as the first stage (ViT-H-14-CLIPA-336 has the same text config); 32 tokens, CLIPA's token_len=32
text_pretrained = ''              # no open_clip weights: the text tower trained in the earlier stages comes with init_from
img_size = 336                    # CLIPA model_h/unmask_tuning_336_scheduleX1.py: res=336; DeltaCLIP-H/14-336
samples = 131_072_000             # CLIPA model_h/unmask_tuning_336_scheduleX1.py: 131072000 samples
mask_ratio = 0.4                  # CLIPA model_h/unmask_tuning_336_scheduleX1.py: mask_ratio = 0.4 (random masking)
eps = 4 / 255                     # AdvXL fine-tuning (base_finetune.py): the pre-training's eps
pgd_steps = 3                     # AdvXL Sec. 4.1 / Table 5's 336 px stage: PGD-3
pgd_step_size = 4 / 255           # AdvXL Sec. 4.1 fine-tuning: step 4/255
batch_size = 16384                # CLIPA model_h/unmask_tuning_336_scheduleX1.py: batchsize=16384
lr = 1e-7 * batch_size / 256      # CLIPA model_h/unmask_tuning_336_scheduleX1.py: lr = 1e-7 x batch / 256, cosine to min_lr 0 (base)
warmup_samples = 26_214_400       # CLIPA model_h/unmask_tuning_336_scheduleX1.py: 26214400 warm-up samples (1600 steps)
crop_scale = (0.4, 1.0)           # CLIPA model_h/unmask_tuning_336_scheduleX1.py: inception_crop(area_min=40)
hflip = False                     # CLIPA: no flip in its pre-processing
# weight decay 0.2, betas (0.9, 0.95): the base, as CLIPA's H/14 336 px config
micro_batch_size = 64             # an estimate: advxl_ft336_in1k_vith's 64 at 336 px, 40% of the patches masked, plus the text tower; confirm with --dry_run=True once train_text_tower lands
grad_ckpt = False
num_workers = 2                   # loader workers per GPU (the base says how)
log_every = 1_638_400             # 100 steps
eval_every = 32_768_000
ckpt_every = 8_192_000
