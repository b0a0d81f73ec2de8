#!/usr/bin/env bash
# A miniature of the paper's CIFAR-10 pipeline (scripts/paper_cifar10.sh) on scikit-learn's
# bundled handwritten digits, on the CPU, no download: every model of the table (vanilla,
# piecewise clustering, OCM16, OCM64, OCM16 + PC, mixup, manifold mixup; 8-bit ResNet-20) is
# trained briefly, attacked with stealthy T-BFA on a few source/target pairs (ASR and PA-ACC
# after every flip) and stealthy TA-LBF on a few samples, a few models also with untargeted BFA
# and random flips; then report.py writes the table (published CIFAR-10 values beside ours) and
# the figures into $OUT/report.
#
# Recipes: the quick start's (scripts/quickstart.sh; README "Quick start" says how they were
# found): cross-entropy models (vanilla, piecewise clustering, mixup, manifold mixup) SGD lr 0.1
# constant, weight decay 5e-4, batch 128, 30 epochs; OCM models Adam lr 2e-3, cosine, weight
# decay 1e-4, batch 64, 15 epochs. The numbers are a miniature, not the paper's: digits has 359
# test images (|D_src| = |D_aux| = 17), and the models train briefly.
#
# Usage: bash scripts/paper_smoke.sh            (from any directory)
# Environment: OUT (the output folder; default $OUT_ROOT/paper_smoke, OUT_ROOT defaulting to
#   runs/; relative paths are taken from the current directory), DEVICE (auto),
#   EPOCHS (both recipes' epochs, for tests), SEED (0), THREADS (2: CPU results depend on the
#   thread count), MODELS (all seven labels), PAIRS (T-BFA pairs, 0:1,3:5,7:2),
#   TBFA_ITERS (flip cap per T-BFA experiment, 200), TALBF_ATTACKS (3), BFA_MODELS (vanilla pc
#   ocm16; empty skips BFA), BFA_ITERS (20), PYTHON, DRY_RUN (1 prints the commands).
#   A rerun skips what is finished; delete $OUT to start over.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
OUT="$(abspath "${OUT:-${OUT_ROOT:-$ROOT/runs}/paper_smoke}")"
DATA_DIR="$(abspath "${DATA_DIR:-$ROOT/data}")"   # digits needs no files
cd "$ROOT"
THREADS="${THREADS:-2}"
SEED="${SEED:-0}"
MODELS="${MODELS:-vanilla pc ocm16 ocm64 ocm16_pc mixup manifold_mixup}"
PAIRS="${PAIRS:-0:1,3:5,7:2}"
TBFA_ITERS="${TBFA_ITERS:-200}"
TALBF_ATTACKS="${TALBF_ATTACKS:-3}"
BFA_MODELS="${BFA_MODELS-vanilla pc ocm16}"
BFA_ITERS="${BFA_ITERS:-20}"
QUIET=1
if [ "$DRY_RUN" != "1" ]; then
  mkdir -p "$OUT"
  LOG="$OUT/pipeline.log"
  TIMINGS="$OUT/timings.tsv"
  : > "$TIMINGS"
fi

BASE=(--dataset digits --arch resnet20_quan --bits 8 --seed "$SEED" --threads "$THREADS"
      --channels-last)
SGD_RECIPE=(-e "${EPOCHS:-30}" -b 128 --opt sgd --lr 0.1 --schedule constant -wd 5e-4)
OCM_RECIPE=(-e "${EPOCHS:-15}" -b 64 --opt adam --lr 2e-3 --schedule cosine -wd 5e-4)
start=$(date +%s)
stamp() { [ "$DRY_RUN" = "1" ] || echo "   ($(( $(date +%s) - start )) s so far)"; }

for m in $MODELS; do
  flags_text="$(model_flags "$m")"
  read -r -a flags <<< "$flags_text"
  case "$m" in
    ocm*) recipe=("${OCM_RECIPE[@]}"); echo "== train $m (Adam, ${recipe[1]} epochs) ==" ;;
    *) recipe=("${SGD_RECIPE[@]}"); echo "== train $m (SGD, ${recipe[1]} epochs) ==" ;;
  esac
  STEP="train $m" train "$OUT/$m" "${BASE[@]}" "${recipe[@]}" "${flags[@]}"
  stamp
done

for m in $MODELS; do
  echo "== stealthy T-BFA on $m, pairs $PAIRS =="
  STEP="tbfa $m" tbfa "$OUT/$m" --pairs "$PAIRS" --avgs 1 --iters "$TBFA_ITERS" \
    --threads "$THREADS"
  echo "== stealthy TA-LBF on $m, $TALBF_ATTACKS attacks =="
  STEP="talbf $m" talbf "$OUT/$m" --n-attacks "$TALBF_ATTACKS" --threads "$THREADS"
  stamp
done

for m in $BFA_MODELS; do
  echo "== untargeted BFA and random flips on $m, $BFA_ITERS iterations =="
  STEP="bfa $m" bfa "$OUT/$m" "$OUT/$m/attack_bfa" --n_iter "$BFA_ITERS" --seed "$SEED" \
    --threads "$THREADS"
  STEP="random $m" bfa "$OUT/$m" "$OUT/$m/attack_bfa_random" --random_bfa --n_iter "$BFA_ITERS" \
    --seed "$SEED" --threads "$THREADS"
  stamp
done

echo "== report ($OUT/report) =="
specs=()
for m in $MODELS; do specs+=("$m=$OUT/$m"); done
QUIET=0 STEP=report report "$OUT/report" "${specs[@]}" --published cifar10 \
  --title "paper pipeline on digits (smoke)"
[ "$DRY_RUN" = "1" ] || echo "total $(( $(date +%s) - start )) s; step timings in $OUT/timings.tsv"
