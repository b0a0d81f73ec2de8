#!/usr/bin/env bash
# Beyond the papers, on the CPU with scikit-learn's digits (README "Number formats and fault
# models"; about 15 minutes on 2 cores): how many bit-flips break a ResNet-20 stored in each
# number format, and whether OCM's advantage against stealthy T-BFA survives realistic fault
# models.
#
#   1. train three ResNet-20s with the quick start's recipes: vanilla 8-bit, OCM16 8-bit, and a
#      float (--bits 32) model with the vanilla recipe;
#   2. BFA (attack_bfa.py) until the test accuracy falls to 11 %: the 8-bit per-layer model as
#      trained, and the float model as fp32, bf16, fp16, and quantized per channel to int8 by
#      PyTorch's own tools (--format torch-int8: accuracy measured on the torch.ao model); then
#      fp32 without its two top bits, and both int8 models with one flip per page;
#   3. stealthy T-BFA (attack_tbfa.py) on vanilla and OCM16 under (a) no constraint, (b) one flip
#      per 4 KiB page, (c) 0 -> 1 flips only;
#   4. the two tables (report.py).
#
# Usage: bash scripts/formats_faults.sh        (from any directory)
# Environment: OUT (runs/formats), DEVICE (cpu: torch-int8 runs on the CPU), SEED (0), THREADS
#   (2), PAIRS (T-BFA source:target pairs, default 0:1,2:3,4:5,6:7,8:9; "all" = the 20 protocol
#   pairs), TBFA_ITERS (200), BFA_ITERS (100), RETRAIN (0: reuse models already trained in OUT),
#   EPOCHS (every model's epochs instead of the recipe's; for tests), PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-runs/formats}"
DEVICE="${DEVICE:-cpu}"
SEED="${SEED:-0}"
THREADS="${THREADS:-2}"
PY="${PYTHON:-python}"
PAIRS="${PAIRS:-0:1,2:3,4:5,6:7,8:9}"
TBFA_ITERS="${TBFA_ITERS:-200}"
BFA_ITERS="${BFA_ITERS:-100}"
RETRAIN="${RETRAIN:-0}"

COMMON=(--dataset digits --arch resnet20_quan --channels-last --device "$DEVICE"
        --threads "$THREADS" --seed "$SEED" --no-progress --overwrite)
VANILLA_RECIPE=(-e 30 -b 128 --opt sgd --lr 0.1 --schedule constant -wd 5e-4)
OCM_RECIPE=(-e 15 -b 64 --opt adam --lr 2e-3 --schedule cosine -wd 5e-4
            --ocm --code_length 16 --output_act tanh)
if [ -n "${EPOCHS:-}" ]; then VANILLA_RECIPE+=(-e "$EPOCHS"); OCM_RECIPE+=(-e "$EPOCHS"); fi
PAIR_FLAGS=(--pairs "$PAIRS")
[ "$PAIRS" = "all" ] && PAIR_FLAGS=()
ATTACK_FLAGS=(--device "$DEVICE" --threads "$THREADS" --no-progress --overwrite)
start=$(date +%s)

train() {  # name, bits, recipe...
  local name="$1" bits="$2"; shift 2
  if [ "$RETRAIN" != "1" ] && [ -f "$OUT/$name/model_best.pth.tar" ]; then
    echo "   $name: reusing $OUT/$name/model_best.pth.tar (RETRAIN=1 trains afresh)"
    return 0
  fi
  "$PY" main.py "${COMMON[@]}" --bits "$bits" "$@" --outdir "$OUT/$name" | tail -n 1
}

echo "== 1/4  train vanilla 8-bit, OCM16 8-bit and float ResNet-20s on digits =="
train vanilla 8 "${VANILLA_RECIPE[@]}"
train ocm16 8 "${OCM_RECIPE[@]}"
train float 32 "${VANILLA_RECIPE[@]}"
echo "   ($(( $(date +%s) - start )) s so far)"

echo "== 2/4  BFA until 11 % test accuracy, each number format =="
for spec in vanilla:trained float:fp32 float:bf16 float:fp16 float:torch-int8; do
  model="${spec%%:*}" format="${spec#*:}"
  "$PY" attack_bfa.py --checkpoint "$OUT/$model/model_best.pth.tar" --format "$format" \
    --n_iter "$BFA_ITERS" --seed "$SEED" "${ATTACK_FLAGS[@]}" \
    --results "$OUT/$model/bfa_$format" > /dev/null
done
# and three under a fault model: no sign bit and no exponent MSB for fp32 (bits 2-31 only); one
# flip per 4 KiB page for the 8-bit per-layer and the torch-int8 models
"$PY" attack_bfa.py --checkpoint "$OUT/float/model_best.pth.tar" --format fp32 --fault-bits 2-31 \
  --n_iter "$BFA_ITERS" --seed "$SEED" "${ATTACK_FLAGS[@]}" --results "$OUT/float/bfa_fp32_bits2-31" \
  > /dev/null
for spec in vanilla:trained float:torch-int8; do
  model="${spec%%:*}" format="${spec#*:}"
  "$PY" attack_bfa.py --checkpoint "$OUT/$model/model_best.pth.tar" --format "$format" \
    --one-flip-per-page --n_iter "$BFA_ITERS" --seed "$SEED" "${ATTACK_FLAGS[@]}" \
    --results "$OUT/$model/bfa_${format}_page" > /dev/null
done
echo "   ($(( $(date +%s) - start )) s so far)"

echo "== 3/4  stealthy T-BFA, pairs $PAIRS, vanilla and OCM16 under three fault models =="
for fault in none page 0to1; do
  case "$fault" in
    none) FAULT_FLAGS=() ;;
    page) FAULT_FLAGS=(--one-flip-per-page) ;;
    0to1) FAULT_FLAGS=(--fault-direction 0to1) ;;
  esac
  for model in vanilla ocm16; do
    "$PY" attack_tbfa.py --checkpoint "$OUT/$model/model_best.pth.tar" "${PAIR_FLAGS[@]}" \
      --avgs 1 --iters "$TBFA_ITERS" "${FAULT_FLAGS[@]}" "${ATTACK_FLAGS[@]}" \
      --results "$OUT/tbfa_$fault/$model/attack_tbfa" > /dev/null
  done
done
echo "   ($(( $(date +%s) - start )) s so far)"

echo "== 4/4  tables (also in $OUT/report_bfa and $OUT/report_tbfa) =="
"$PY" report.py int8="$OUT/vanilla" float="$OUT/float" --attacks bfa --published none \
  --no-figures --out "$OUT/report_bfa" | sed -n '/^| model/,/^$/p'
TBFA_MODELS=()
for fault in none page 0to1; do
  for model in vanilla ocm16; do
    TBFA_MODELS+=("$model@$fault=$OUT/tbfa_$fault/$model")
  done
done
"$PY" report.py "${TBFA_MODELS[@]}" --attacks tbfa --published none --no-figures \
  --out "$OUT/report_tbfa" | sed -n '/^| model/,/^$/p' | cut -d'|' -f1-7 | sed 's/$/|/'
echo "total $(( $(date +%s) - start )) s"
