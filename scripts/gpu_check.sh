#!/usr/bin/env bash
# First check of the CUDA paths on one GPU, about 9 minutes: the demo in bf16, host syncs in the
# step, img/s / MFU / memory against the plan, NCCL + torch.compile, evaluation under torchrun, and
# a real out-of-memory halving at ViT-H scale. Logs, JSON and a summary under $OUT.
#   OUT=out/gpu_check bash scripts/gpu_check.sh      (PY=... for another interpreter)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}; TR="$PY -m torch.distributed.run --standalone --nproc_per_node=1"
OUT=${OUT:-out/gpu_check}; W=$OUT/runs; mkdir -p "$W"
LOG=$OUT/log.txt; SUM=$OUT/summary.txt
export PYTHONUNBUFFERED=1
step() { local name=$1 secs=$2; shift 2; local s=$(date +%s); echo "===== $name: $*" >> "$LOG"
         timeout -k 5 "$secs" "$@" >> "$LOG" 2>&1; echo "rc=$? $name $(( $(date +%s) - s ))s" | tee -a "$SUM"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$SUM" 2>&1
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >> "$SUM" 2>&1

# 1. the demo's first stage on the GPU (bf16, eager)
step demo_pre 150 $PY train.py --num_workers=6 --out_dir=$W/demo_pre
# 2. host syncs, counted per source line: a line counted once per step (128 here) syncs inside the step
step syncs 120 $PY -W always::UserWarning -c "import sys, runpy, torch; torch.cuda.set_sync_debug_mode('warn'); sys.argv = ['train.py', '--samples=8192', '--num_workers=6', '--eval_every=0', '--final_eval_samples=64', '--out_dir=$W/sync']; runpy.run_path('train.py', run_name='__main__')"
awk '/===== syncs/,/===== bench/' "$LOG" | grep 'synchronizing' | sed -E 's/: UserWarning.*//; s#.*site-packages/##' | sort | uniq -c | sort -rn > "$OUT/syncs.txt"
# 3. img/s, MFU, the memory plan beside max_memory_allocated, the largest power-of-two batch
step bench 300 $PY bench.py --rows cuda --cuda_rows vit_base_patch16:112:1:256,vit_huge_patch14:84:2:128:eager,vit_large_patch16:224:3:64:eager --out $OUT/bench_cuda.json
# 4. the demo's second stage, then PGD-20 and AutoAttack under torchrun (NCCL, and gloo for the ranks' meetings)
step demo_ft 120 $PY train.py config/demo_ft.py --num_workers=6 --init_from=$W/demo_pre --out_dir=$W/demo_ft
step eval_pgd20 90 $TR eval_autoattack.py --ckpt $W/demo_ft --pgd20 --eps 8/255 --n_ex 500
step eval_aa 120 $TR eval_autoattack.py --ckpt $W/demo_ft --eps 8/255 --n_ex 100 --state_path $W/aa_state
# 5. NCCL + torch.compile training
step nccl_compile 150 $TR train.py --compile=True --num_workers=6 --samples=16000 --eval_every=0 --out_dir=$W/nccl_compile
# 6. ViT-H/14 at 224 px (random weights): AutoAttack's batch from the plan and the free memory, then a
#    batch that does not fit, halved after the real out-of-memory error
$PY -c "import torch; from model import create_model; torch.save(create_model('vit_huge_patch14').state_dict(), '$W/vith.pt')"
step vith_dry 60 $PY eval_autoattack.py --ckpt $W/vith.pt --arch vit_huge_patch14 --img_size 224 --n_ex 1000 --dry_run
step vith_oom 120 $PY eval_autoattack.py --ckpt $W/vith.pt --arch vit_huge_patch14 --img_size 224 --n_ex 1000 --bs 1000 --pgd20 --bf16 --out_dir $W/vith_eval
rm -f $W/vith.pt
