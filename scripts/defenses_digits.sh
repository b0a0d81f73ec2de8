#!/usr/bin/env bash
# The defenses x attacks matrix in miniature, on the CPU, no download (docs/algorithms.md
# section 14): five 8-bit ResNet-20 models of the quick-start recipes trained on scikit-learn's
# digits (vanilla, OCM16, piecewise clustering, OCM16 + clustering, binarized) and the vanilla
# model behind two deployment-time defenses (RADAR checksums, DeepNcode codewords), each
# attacked by the papers' attacks and by the attacks that know the defense, under three fault
# models (every flip, one flip per 4 KiB page; FAULTS adds 0 -> 1 only), on one protocol; the
# matrix is printed
# (also in $OUT/matrix/matrix.md, with matrix.csv, defenses.csv, matrix.png and
# success_vs_flips.png).
#
# Usage: bash scripts/defenses_digits.sh        (from any directory)
# Environment: OUT (runs/defenses_digits), DEVICE (auto), THREADS (2: the trainings' CPU
#   threads; results depend on it; the trainings run in one process), MATRIX_NPROC (matrix
#   processes under torchrun, sharing the items of all cells: on the CPU 2 with 2 cores or more,
#   else 1), MATRIX_THREADS (each matrix process's threads: 1 with several processes, else
#   THREADS), SEED (0), PAIRS (T-BFA pairs, default 0:1,2:3,4:5,6:7,8:9; "all" = the 20 of the
#   protocol), TALBF_ATTACKS (5), ATTACKS (the attack specs, space-separated), FAULTS (the fault
#   models: none page; "none page 0to1" adds 0 -> 1 only flips, about half as long again),
#   RADAR and DEEPNCODE (the two deployment-time rows' defense specs; "none" drops the row),
#   TRAIN_ONLY=1 (stop after training), PYTHON, DRY_RUN=1 (print the commands). A trained model
#   is kept (delete <model>/train.done to retrain); the matrix continues where it stopped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
OUT="$(abspath "${OUT:-$ROOT/runs/defenses_digits}")"
cd "$ROOT"
THREADS="${THREADS:-2}"
SEED="${SEED:-0}"
PAIRS="${PAIRS:-0:1,2:3,4:5,6:7,8:9}"
TALBF_ATTACKS="${TALBF_ATTACKS:-5}"
ATTACKS="${ATTACKS:-tbfa tbfa_adaptive:scores=preact talbf bfa bfa_adaptive:scores=preact radar_pairs deepncode_aware:max_cost=4}"
RADAR="${RADAR:-radar:group_size=16,key=1}"
DEEPNCODE="${DEEPNCODE:-deepncode}"
FAULTS="${FAULTS:-none page}"
DATA_DIR="$OUT"   # digits needs no data folder
out_dir "$OUT"
start=$(date +%s)

COMMON=(--dataset digits --arch resnet20_quan --bits 8 --channels-last --device "$DEVICE"
        --threads "$THREADS" --seed "$SEED" --no-progress)
# The quick start's recipes (scripts/quickstart.sh explains them): cross-entropy models SGD,
# OCM models Adam; clustering adds its loss term (lambda 1e-3, the papers').
CE_RECIPE=(-e 30 -b 128 --opt sgd --lr 0.1 --schedule constant -wd 5e-4)
OCM_RECIPE=(-e 15 -b 64 --opt adam --lr 2e-3 --schedule cosine -wd 5e-4)
MODELS=(vanilla ocm16 pc ocm16_pc binarized)
for label in "${MODELS[@]}"; do
  # shellcheck disable=SC2207
  flags=($(model_flags "$label"))
  case "$label" in ocm*) recipe=("${OCM_RECIPE[@]}") ;; *) recipe=("${CE_RECIPE[@]}") ;; esac
  echo "== train $label =="
  NPROC=1 STEP="train $label" train "$OUT/$label" "${COMMON[@]}" "${recipe[@]}" "${flags[@]}"
done
echo "   ($(( $(date +%s) - start )) s so far)"
[ "${TRAIN_ONLY:-0}" = "1" ] && exit 0

ROWS=()
for label in "${MODELS[@]}"; do ROWS+=(--model "$label=$OUT/$label/model_best.pth.tar"); done
for spec in "$RADAR" "$DEEPNCODE"; do
  [ "$spec" = "none" ] && continue
  name="${spec%%:*}"
  ROWS+=(--model "$name=$OUT/vanilla/model_best.pth.tar" --deploy "$name=$spec")
done
PAIR_FLAGS=(--pairs "$PAIRS")
[ "$PAIRS" = "all" ] && PAIR_FLAGS=(--all-pairs)
if [ -z "${MATRIX_NPROC:-}" ]; then
  MATRIX_NPROC=$(DEVICE="$DEVICE" "$PY" -c 'import os, torch
d = os.environ["DEVICE"]
gpu = d.startswith("cuda") or (d == "auto" and torch.cuda.is_available())
print(1 if gpu else min(2, os.cpu_count() or 1))')
fi
MATRIX_THREADS="${MATRIX_THREADS:-$([ "$MATRIX_NPROC" -gt 1 ] && echo 1 || echo "$THREADS")}"
echo "== the matrix: $(( ${#ROWS[@]} / 2 - $(grep -o -- --deploy <<< "${ROWS[*]}" | wc -l) )) models x attacks ($ATTACKS) x faults ($FAULTS) =="
# shellcheck disable=SC2206
NPROC="$MATRIX_NPROC" STEP="matrix" run_py evaluate_defenses.py --dataset digits "${ROWS[@]}" \
  --attacks $ATTACKS --faults $FAULTS "${PAIR_FLAGS[@]}" --talbf-samples "$TALBF_ATTACKS" \
  --bfa-batch 64 --bfa-iters 50 --device "$DEVICE" --threads "$MATRIX_THREADS" \
  --seed "$SEED" \
  --no-progress --out "$OUT/matrix"
echo "total $(( $(date +%s) - start )) s"
