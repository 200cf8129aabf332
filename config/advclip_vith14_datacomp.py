# Joint adversarial CLIP pre-training after Double Visual Defense (Wang, Xie, Bartoldson,
# Kailkhura, arXiv 2501.09446, 2025): ViT-H/14 image tower AND text tower trained together from
# scratch ("adversarial vision-language pre-training from scratch using web-scale data",
# abstract) on DataComp-1B, the contrastive loss on PGD images. The stored sources give the
# paper's abstract, code and model cards but not its training-details section: every number
# below is CLIPA's H/14 recipe (Li, Wang, Xie 2023, CLIPA-v2; UCSC-VLAA/CLIPA
# clipa_jax/configs/model_h/) or, for the attack, AdvXL's (Table 2's ViT-H/14 DataComp-1B row,
# as config/advxl_vith_datacomp.py). docs/joint-clip.md has the table of sources. Then the
# higher-resolution stages (CLIPA-v2's 224 and 336 px; the released DeltaCLIP-H/14 is 336 px):
#   torchrun --nproc_per_node=8 train.py config/advclip_vith14_datacomp.py
#   torchrun --nproc_per_node=8 train.py config/advclip_ft_vith14_datacomp.py --init_from=out/advclip_vith14_datacomp --out_dir=out/advclip_ft_vith14_datacomp
#   torchrun --nproc_per_node=8 train.py config/advclip_ft336_vith14_datacomp.py --init_from=out/advclip_ft_vith14_datacomp --out_dir=out/advclip_ft336_vith14_datacomp
extends('base_web_pretrain.py')
out_dir = 'out/advclip_vith14_datacomp'
train_data = '/data/datacomp1b/{00000000..00139827}.tar'  # model cards (huggingface.co/zw123/delta_clip_h14_336): datasets mlfoundations/datacomp_1b and UCSC-VLAA/Recap-DataComp-1B
model = 'vit_huge_patch14'        # the released DeltaCLIP-H/14 (zw123/delta_clip_h14_336; repo README: "DeltaCLIP-H/14-336")
train_text_tower = True           # paper abstract: vision-language pre-training from scratch, so both towers train
text_tower = 'ViT-H-14-CLIPA'     # CLIPA H/14: text tower of the image tower's size ('variant': img_name), BERT WordPiece vocab, last-token pooling; DeltaCLIP ships a WordPiece vocab.txt and its eval code tokenizes it with a BERT tokenizer (zw615/Double_Visual_Defense CLIP_benchmark/clip_benchmark/open_clip/factory.py)
text_pretrained = ''              # random init: trained from scratch (paper abstract)
img_size = 84                     # CLIPA model_h/84_8_pre_training.py: res=84 (6x6 patches of 14 px; AdvXL Table 2's ViT-H/14 DataComp row too)
samples = 12_811_670_000          # CLIPA model_h/84_8_pre_training.py: 10000 virtual ImageNet epochs x 1281167
eps = 4 / 255                     # AdvXL (base); DeltaCLIP's H/14 robustness evaluation attacks at eps 4 (CLIP_benchmark/scripts/dvd_clip_h14_hf_adv.sh: EPS=4)
pgd_steps = 2                     # AdvXL Table 2, ViT-H/14 on DataComp-1B: PGD-2
pgd_step_size = 3 / 255           # AdvXL Table 1b: step 3/255 with 2 steps
batch_size = 65536                # CLIPA model_h/84_8_pre_training.py: batchsize=65536
lr = 8e-6 * batch_size / 256      # CLIPA model_h/84_8_pre_training.py: lr = 8e-6 x batch / 256, cosine to min_lr 0 (base)
warmup_samples = 3200 * 65536     # CLIPA model_h/84_8_pre_training.py: 3200 warm-up steps ("for 64K huge, smaller warmup will collapse")
crop_scale = (0.4, 1.0)           # CLIPA model_h/84_8_pre_training.py: inception_crop(area_min=40), bilinear, anti-aliased
hflip = False                     # CLIPA model_h/84_8_pre_training.py: no flip in its pre-processing
# weight decay 0.2, betas (0.9, 0.95), temperature init 1/0.07: the base, as CLIPA's H/14 config
micro_batch_size = 512            # an estimate: advxl_vith_datacomp's 1024 less room for the text tower's activations, gradients and AdamW state; confirm with --dry_run=True once train_text_tower lands
grad_ckpt = False
num_workers = 2                   # loader workers per GPU (the base says how)
