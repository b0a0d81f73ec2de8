#!/usr/bin/env bash
# Quick start on the CPU: train a vanilla and an OCM16 8-bit ResNet-20 on scikit-learn's bundled
# handwritten digits (no download), print their clean test accuracies, then attack both with
# stealthy T-BFA on a few source/target pairs and print the comparison.
#
# The papers' recipe (SGD lr 0.1, /10 steps, 160 epochs) needs ~160 epochs here; this short
# recipe was found by measurement on a 2-core CPU: Adam lr 2e-3 with a cosine schedule and
# batch 64 (more steps per epoch) brings both models to >= 98% in 15 epochs (about 50 s each).
#
# Usage: bash scripts/quickstart.sh            (from any directory)
# Environment overrides: OUT (runs/quickstart), DEVICE (auto), EPOCHS (15), SEED (0),
#   PAIRS (T-BFA source:target pairs, default 0:1,2:3,4:5,6:7,8:9), TALBF_ATTACKS (5 TA-LBF
#   attacks per model), ATTACK (1; 0 skips both attacks)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-runs/quickstart}"
DEVICE="${DEVICE:-auto}"
EPOCHS="${EPOCHS:-15}"
SEED="${SEED:-0}"
PY="${PYTHON:-python}"
PAIRS="${PAIRS:-0:1,2:3,4:5,6:7,8:9}"
ATTACK="${ATTACK:-1}"
TALBF_ATTACKS="${TALBF_ATTACKS:-5}"

RECIPE=(--dataset digits --arch resnet20_quan --bits 8 -e "$EPOCHS" -b 64 --opt adam --lr 2e-3
        --schedule cosine -wd 1e-4 --device "$DEVICE" --seed "$SEED" --no-progress
        --overwrite)  # the demo trains afresh each time
start=$(date +%s)

echo "== 1/2  vanilla 8-bit ResNet-20 on digits =="
"$PY" main.py "${RECIPE[@]}" --outdir "$OUT/vanilla"
echo "== 2/2  OCM16 8-bit ResNet-20 on digits =="
"$PY" main.py "${RECIPE[@]}" --ocm --code_length 16 --output_act tanh --outdir "$OUT/ocm16"

echo "== clean test accuracy (best checkpoints) =="
for model in vanilla ocm16; do
  "$PY" main.py --eval "$OUT/$model/model_best.pth.tar" --device "$DEVICE" --no-progress \
    | tail -n 1 > "$OUT/$model/eval.json"
done
"$PY" - "$OUT" "$start" <<'PYEOF'
import json, sys, time
out, start = sys.argv[1], int(sys.argv[2])
print(f"{'model':<10} {'top-1 %':>8} {'top-5 %':>8} {'test images':>12}")
for model in ("vanilla", "ocm16"):
    r = json.load(open(f"{out}/{model}/eval.json"))
    print(f"{model:<10} {r['top1']:>8.2f} {r['top5']:>8.2f} {r['n']:>12}")
print(f"checkpoints and logs in {out}/ ({time.time() - start:.0f} s)")
PYEOF
[ "$ATTACK" = "0" ] && exit 0
# The models were just retrained: results of earlier attacks on them are stale.
rm -rf "$OUT"/vanilla/attack_tbfa "$OUT"/ocm16/attack_tbfa "$OUT"/vanilla/attack_talbf \
       "$OUT"/ocm16/attack_talbf

echo "== stealthy T-BFA, pairs $PAIRS (results in $OUT/<model>/attack_tbfa) =="
for model in vanilla ocm16; do
  "$PY" attack_tbfa.py --checkpoint "$OUT/$model/model_best.pth.tar" --pairs "$PAIRS" --avgs 1 \
    --iters 300 --device "$DEVICE" --no-progress --results "$OUT/$model/attack_tbfa" > /dev/null
done
"$PY" - "$OUT" "$start" <<'PYEOF'
import sys, time
from utils.results import JsonlResults, format_table, mean_std
out, start = sys.argv[1], int(sys.argv[2])
rows = []
for model in ("vanilla", "ocm16"):
    recs = JsonlResults(f"{out}/{model}/attack_tbfa/results.jsonl").records
    row = {"model": model, "experiments": len(recs)}
    for metric, name in (("clean_acc", "clean %"), ("n_flips", "# bit-flips"),
                         ("asr", "ASR %"), ("pa_acc", "PA-ACC %"), ("test_acc", "test %")):
        m, s = mean_std([r[metric] for r in recs])
        row[name] = f"{m:.2f} +- {s:.2f}"
    rows.append(row)
print(format_table(rows, list(rows[0])))
print("More bit-flips and a lower PA-ACC mean a more robust model (OCM paper, supplement).")
PYEOF

echo "== stealthy TA-LBF, $TALBF_ATTACKS attacks per model (results in $OUT/<model>/attack_talbf) =="
for model in vanilla ocm16; do
  "$PY" attack_talbf.py --checkpoint "$OUT/$model/model_best.pth.tar" --n-attacks "$TALBF_ATTACKS" \
    --device "$DEVICE" --no-progress --results "$OUT/$model/attack_talbf" > /dev/null
done
"$PY" - "$OUT" "$start" <<'PYEOF'
import sys, time
from utils.results import JsonlResults, format_table, mean_std
out, start = sys.argv[1], int(sys.argv[2])
rows = []
for model in ("vanilla", "ocm16"):
    recs = JsonlResults(f"{out}/{model}/attack_talbf/results.jsonl").records
    ok = [r for r in recs if r["success"]]
    row = {"model": model, "attacks": len(recs),
           "ASR %": f"{100.0 * len(ok) / max(len(recs), 1):.1f}"}
    for metric, name in (("n_flips", "# bit-flips"), ("pa_acc", "PA-ACC %")):
        m, s = mean_std([r[metric] for r in ok])
        row[name] = f"{m:.2f} +- {s:.2f}"
    rows.append(row)
print(format_table(rows, list(rows[0])))
print(f"total {time.time() - start:.0f} s")
PYEOF