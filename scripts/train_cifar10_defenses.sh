#!/usr/bin/env bash
# The BFA repository's training flows (train_CIFAR.sh) for its two defenses, on CIFAR-10 with
# ResNet-20: an 8-bit quantization-aware baseline, binarization-aware training (resnet20_bin,
# 1-bit weights) and piecewise weight clustering (8-bit, lambda 1e-3; docs/algorithms.md section 4), with the
# BFA repository's recipe: SGD momentum 0.9, lr 0.1 divided by 10 at epochs 80 and 120 of 160,
# batch 128, weight decay 3e-4. Models go to $OUT_ROOT/cifar10_bfa/<label>; scripts/bfa_cifar10.sh
# attacks them.
#
# Usage: DATA_DIR=/data OUT_ROOT=/scratch/ocm bash scripts/train_cifar10_defenses.sh   (any directory)
# Environment: DATA_DIR (data; holds cifar-10-batches-py/), OUT_ROOT (runs/paper), DEVICE (auto),
#   MODELS (vanilla binarized pc; ocm<L> also works), EPOCHS (160), SCHEDULE (80 120), WD (3e-4),
#   PC_LAMBDA (1e-3), SEED (0), WORKERS (4), PYTHON, DRY_RUN (1 prints the commands).
#   A finished training is skipped, an interrupted one continues.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
enter_root
MODELS="${MODELS:-vanilla binarized pc}"
EPOCHS="${EPOCHS:-160}"
SCHEDULE="${SCHEDULE:-80 120}"
WD="${WD:-3e-4}"
SEED="${SEED:-0}"
WORKERS="${WORKERS:-4}"
out_dir "$OUT_ROOT/cifar10_bfa"
read -r -a schedule <<< "$SCHEDULE"
gammas=()
for _ in "${schedule[@]}"; do gammas+=(0.1); done

for m in $MODELS; do
  if [ "$m" = "binarized" ]; then
    arch=(--arch resnet20_bin --bits 1)   # the binarized model: no clustering (BFA README)
    flags=()
  else
    arch=(--arch resnet20_quan --bits 8)
    flags_text="$(model_flags "$m")"
    read -r -a flags <<< "$flags_text"
  fi
  echo "== train $m (CIFAR-10, ${arch[*]}, $EPOCHS epochs, BFA repository recipe) =="
  STEP="train $m" train "$OUT/$m" --dataset cifar10 "${arch[@]}" -e "$EPOCHS" -b 128 --opt sgd \
    --lr 0.1 --momentum 0.9 --schedule "${schedule[@]}" --gammas "${gammas[@]}" -wd "$WD" \
    --seed "$SEED" --workers "$WORKERS" "${flags[@]}"
done
