#!/usr/bin/env bash
# The BFA repository's attack flows (BFA_CIFAR.sh, with and without --random_bfa) on CIFAR-10
# ResNet-20 models with and without the defenses: trains what scripts/train_cifar10_defenses.sh
# trains (8-bit baseline, binarization-aware, piecewise clustering, plus OCM16 here) unless
# already trained, then runs untargeted BFA (128 attack images labelled by the model, stop at
# 11 % test accuracy or after 100 iterations; docs/algorithms.md section 6) and the random-flip baseline
# (100 random bits) RUNS times each with seeds 1..RUNS (another attack batch / other random
# bits each time), and writes the BFA table and the accuracy-against-flips figure into
# $OUT_ROOT/cifar10_bfa/report.
#
# Usage: DATA_DIR=/data OUT_ROOT=/scratch/ocm bash scripts/bfa_cifar10.sh   (any directory)
# Environment: DATA_DIR (data), OUT_ROOT (runs/paper), DEVICE (auto), MODELS (vanilla binarized
#   pc ocm16), RUNS (5), N_ITER (100), RANDOM_ITER (100), K_TOP (unset: every weight is a
#   candidate), ATTACK_SAMPLE_SIZE (128), TRAIN (1; 0 only attacks), plus the training variables
#   of train_cifar10_defenses.sh, PYTHON, DRY_RUN (1 prints the commands).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_lib.sh"
enter_root
export MODELS="${MODELS:-vanilla binarized pc ocm16}"
RUNS="${RUNS:-5}"
N_ITER="${N_ITER:-100}"
RANDOM_ITER="${RANDOM_ITER:-100}"
ATTACK_SAMPLE_SIZE="${ATTACK_SAMPLE_SIZE:-128}"
TRAIN="${TRAIN:-1}"
OUT="$OUT_ROOT/cifar10_bfa"
extra=()
[ -n "${K_TOP:-}" ] && extra+=(--k_top "$K_TOP")

if [ "$TRAIN" = "1" ]; then
  DATA_DIR="$DATA_DIR" OUT_ROOT="$OUT_ROOT" bash "$HERE/train_cifar10_defenses.sh"
fi
[ "$DRY_RUN" = "1" ] || { mkdir -p "$OUT"; TIMINGS="$OUT/timings.tsv"; }

specs=()
for m in $MODELS; do
  for seed in $(seq 1 "$RUNS"); do
    echo "== BFA on $m, run $seed of $RUNS =="
    STEP="bfa $m" bfa "$OUT/$m" "$OUT/$m/attack_bfa/run$seed" --seed "$seed" \
      --attack_sample_size "$ATTACK_SAMPLE_SIZE" --n_iter "$N_ITER" "${extra[@]}"
    echo "== random flips on $m, run $seed of $RUNS =="
    STEP="random $m" bfa "$OUT/$m" "$OUT/$m/attack_bfa_random/run$seed" --seed "$seed" \
      --random_bfa --n_iter "$RANDOM_ITER"
  done
  specs+=("$m=$OUT/$m")
done
echo "== report: $OUT/report =="
STEP=report report "$OUT/report" "${specs[@]}" --attacks bfa \
  --title "CIFAR-10 ResNet-20, untargeted BFA and random flips"
