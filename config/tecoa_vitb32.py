# TeCoA (Mao et al., "Understanding Zero-Shot Adversarial Robustness for Large-Scale Models",
# ICLR 2023): supervised adversarial fine-tuning of OpenAI's CLIP ViT-B/32 image tower on
# ImageNet with the text-guided contrastive loss: cross-entropy over 100 x cos(image, class
# prompt) with the frozen text tower's prompt embeddings as the classifier, attacked with the
# same loss (clip_head.tecoa_loss).
#   torchrun --nproc_per_node=8 train.py config/tecoa_vitb32.py
#   python eval_autoattack.py --ckpt out/tecoa_vitb32 --data /data/imagenet --eps 1/255
# Published (official README's challenge table, "TeCoA w/ Finetuning"): 55.97% clean, 38.18%
# robust (zero-shot, eps 1/255). Sources: github.com/cvlab-columbia/ZSRobust4FoundationModel,
# README (the fine-tuning command: --batch_size 256 --dataset ImageNet --train_eps 1
# --train_numsteps 2 --train_stepsize 1) and finetuning.py (every other value: its defaults).
out_dir = 'out/tecoa_vitb32'
loss = 'tecoa'
init_from = 'ViT-B-32/openai'          # finetuning.py: clip.load('ViT-B/32')
text_tower = 'ViT-B-32'                # the frozen text tower of the same CLIP model
text_pretrained = 'openai'
tecoa_templates = ('This is a photo of a {}',)  # finetuning.py: template = 'This is a photo of a {}' (training
                                       # head only; evaluation uses prompt_templates, () = CLIP's 80)
data = 'imagefolder'                   # --dataset ImageNet
train_data = '/data/imagenet/train'
val_data = '/data/imagenet/val'
num_classes = 1000                     # CLIP's ImageNet class names (theirs: refine_classname of their list)
img_size = 224                         # finetuning.py preprocess224: Resize(256) + CenterCrop(224), no augmentation
crop_scale = (1.0, 1.0)                # (train.py's loader resizes the whole image: close to their center crop)
hflip = False                          # RandomHorizontalFlip commented out in their code
auto_augment = ''
mixup, cutmix = 0.0, 0.0
label_smoothing = 0.0                  # plain nn.CrossEntropyLoss
val_crop_pct = 0.875                   # Resize(256) + CenterCrop(224)

# optimisation: finetuning.py defaults (the README command sets none of them)
samples = 10 * 1_281_167               # --epochs 10
batch_size = 256                       # README: --batch_size 256
optimizer = 'sgd'                      # --optim sgd: torch.optim.SGD over model.visual's parameters only
momentum = 0.9                         # --momentum 0.9
lr = 1e-7                              # --learning_rate default 1e-7 (left as is by the README command; the
                                       # paper's text was not checked here: confirm before a full run)
min_lr = 0.0                           # utils.cosine_lr: linear warm-up, then cosine to 0
warmup_samples = 1_000 * 256           # --warmup 1000 (steps)
weight_decay = 0.0                     # --weight_decay 0
grad_clip = 0.0
drop_path_rate = 0.0
ema_decay = 0.0

# the attack: README --train_eps 1 --train_numsteps 2 --train_stepsize 1 (L_inf, attack_pgd)
norm = 'Linf'
eps = 1 / 255
pgd_steps = 2
pgd_step_size = 1 / 255
pgd_random_start = True                # attack_pgd: delta.uniform_(-eps, eps)
eps_warmup = 0
eval_eps = 0.0                         # = eps; their validation: --test_eps 1 (PGD, or AutoAttack apgd-ce/dlr)
eval_pgd_steps = 20
eval_step_size = 1 / 255

# bookkeeping
num_workers = 10
log_every = 256_000
eval_every = 1_281_167                 # once per epoch (--validate_freq 1)
eval_samples = 1_000
final_eval_samples = 5_000
ckpt_every = 1_281_167
