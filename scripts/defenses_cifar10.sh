#!/usr/bin/env bash
# The defenses x attacks matrix on CIFAR-10 (docs/algorithms.md sections 14 and 15): the 8-bit
# ResNet-20 models of the papers (vanilla, OCM16, piecewise clustering, OCM16 + clustering,
# binarized; the papers' recipe, 160 epochs; models paper_cifar10.sh trained are reused) and
# the vanilla model behind RADAR and DeepNcode, each under the papers' attacks and the attacks
# that know the defense, under three fault models, on the paper's protocol (20 pairs x
# TBFA_AVGS repetitions, |D_src| = |D_aux| = 500, TA-LBF attacks, BFA runs to chance accuracy).
# The matrix goes to $OUT_ROOT/cifar10/matrix (matrix.md printed; matrix.csv, defenses.csv,
# matrix.png, success_vs_flips.png).
#
# Usage: DATA_DIR=/data OUT_ROOT=/scratch/ocm bash scripts/defenses_cifar10.sh   (any directory)
# Environment: DATA_DIR (data; holds cifar-10-batches-py/), OUT_ROOT (runs/paper), DEVICE
#   (auto), EPOCHS (160), SEED (0), MODELS (vanilla ocm16 pc ocm16_pc binarized), TBFA_AVGS
#   (5), TALBF_ATTACKS (100), BFA_RUNS (5), ATTACKS, FAULTS (none page 0to1), RADAR
#   (radar:group_size=16,key=1: ResNet-20's first layer holds 432 weights, one group at the
#   paper's 512, zeroed whole on one detection; "none" drops the row), DEEPNCODE
#   (deepncode), NPROC (torchrun processes for the matrix), WORKERS (4), PYTHON, DRY_RUN.
# Every step can be repeated: finished trainings are skipped, the matrix continues where it
# stopped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
paper_setup cifar10 resnet20_quan "vanilla ocm16 pc ocm16_pc binarized" "${TALBF_ATTACKS:-100}"
ATTACKS="${ATTACKS:-tbfa tbfa_adaptive:scores=preact talbf talbf_adaptive:scores=preact bfa bfa_adaptive:scores=preact radar_pairs deepncode_aware:max_cost=4}"
FAULTS="${FAULTS:-none page 0to1}"
RADAR="${RADAR:-radar:group_size=16,key=1}"
DEEPNCODE="${DEEPNCODE:-deepncode}"
BFA_RUNS="${BFA_RUNS:-5}"
rows=()
for m in $MODELS; do
  echo "== train $m: $DATASET, $ARCH, $BITS-bit, $EPOCHS epochs =="
  read -r -a flags <<< "$(model_flags "$m")"
  STEP="train $m" train "$OUT/$m" --dataset "$DATASET" --arch "$ARCH" --bits "$BITS" \
    -e "$EPOCHS" --seed "$SEED" --workers "$WORKERS" "${flags[@]}"
  rows+=(--model "$m=$OUT/$m/model_best.pth.tar")
done
for spec in "$RADAR" "$DEEPNCODE"; do
  [ "$spec" = "none" ] && continue
  rows+=(--model "${spec%%:*}=$OUT/vanilla/model_best.pth.tar" --deploy "${spec%%:*}=$spec")
done
echo "== the matrix: $OUT/matrix =="
read -r -a attacks <<< "$ATTACKS"
read -r -a faults <<< "$FAULTS"
STEP=matrix run_py evaluate_defenses.py --data_dir "$DATA_DIR" --dataset cifar10 "${rows[@]}" \
  --attacks "${attacks[@]}" --faults "${faults[@]}" --all-pairs --reps "$TBFA_AVGS" \
  --iters 5000 --talbf-samples "$TALBF_ATTACKS" --bfa-reps "$BFA_RUNS" --device "$DEVICE" \
  --seed "$SEED" --no-progress --out "$OUT/matrix"
