# Second stage of config/advclip_vith14_datacomp.py (joint adversarial CLIP after Double Visual
# Defense, arXiv 2501.09446): both towers keep training on DataComp-1B at 224 px. The paper's
# stored sources do not give this stage; it is CLIPA-v2's H/14 224 px fine-tuning
# (UCSC-VLAA/CLIPA clipa_jax/configs/model_h/unmask_tuning_224_scheduleX4.py) with AdvXL's
# fine-tuning attack (Sec. 4.1: PGD-3, step 4/255). Sources: docs/joint-clip.md.
#   torchrun --nproc_per_node=8 train.py config/advclip_ft_vith14_datacomp.py --init_from=out/advclip_vith14_datacomp --out_dir=out/advclip_ft_vith14_datacomp
extends('base_web_pretrain.py')
out_dir = 'out/advclip_ft_vith14_datacomp'
init_from = 'out/advclip_vith14_datacomp'
train_data = '/data/datacomp1b/{00000000..00139827}.tar'  # as the first stage (model cards: DataComp-1B, Recap-DataComp-1B)
model = 'vit_huge_patch14'        # as the first stage
train_text_tower = True           # as the first stage: both towers train
text_tower = 'ViT-H-14-CLIPA'     # as the first stage; CLIPA's fine-tuning text length is this config's 32 tokens (token_len=32)
text_pretrained = ''              # no open_clip weights: the text tower trained in the first stage comes with init_from
img_size = 224                    # CLIPA model_h/unmask_tuning_224_scheduleX4.py: res=224
samples = 524_288_000             # CLIPA model_h/unmask_tuning_224_scheduleX4.py: 131072000 x 4 samples
mask_ratio = 0.3                  # CLIPA model_h/unmask_tuning_224_scheduleX4.py: mask_ratio = 0.3 (random masking, CLIPA-v2)
eps = 4 / 255                     # AdvXL fine-tuning (base_finetune.py): the pre-training's eps
pgd_steps = 3                     # AdvXL Sec. 4.1 fine-tuning: PGD-3
pgd_step_size = 4 / 255           # AdvXL Sec. 4.1 fine-tuning: step 4/255
batch_size = 32768                # CLIPA model_h/unmask_tuning_224_scheduleX4.py: batchsize=32768
lr = 4e-7 * batch_size / 256      # CLIPA model_h/unmask_tuning_224_scheduleX4.py: lr = 4e-7 x batch / 256, cosine to min_lr 0 (base)
warmup_samples = 26_214_400       # CLIPA model_h/unmask_tuning_224_scheduleX4.py: 26214400 warm-up samples (800 steps)
crop_scale = (0.4, 1.0)           # CLIPA model_h/unmask_tuning_224_scheduleX4.py: inception_crop(area_min=40)
hflip = False                     # CLIPA: no flip in its pre-processing
# weight decay 0.2, betas (0.9, 0.95): the base, as CLIPA's H/14 224 px config
micro_batch_size = 128            # an estimate: advxl_ft_in1k_vith's 128 at 224 px, 30% of the patches masked, plus the text tower; confirm with --dry_run=True once train_text_tower lands
grad_ckpt = False
num_workers = 2                   # loader workers per GPU (the base says how)
log_every = 3_276_800             # 100 steps
eval_every = 65_536_000
ckpt_every = 16_384_000
