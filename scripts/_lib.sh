# Shared by the paper scripts (sourced, not run): paths, the command runner, and one function per
# pipeline step. Every step can be repeated: a finished training is skipped (train.done marker),
# an interrupted one resumes (main.py --resume), the T-BFA / TA-LBF campaigns skip finished
# experiments themselves, a finished BFA run is skipped.
#
# Environment read here (each script documents the ones it uses):
#   PYTHON   python interpreter (python)
#   DEVICE   auto, cpu, cuda, cuda:<i> (auto)
#   DRY_RUN  1: print the commands ("+ python main.py ...", one per line) instead of running them
#   QUIET    1: send the commands' output to $LOG (the scripts set it) instead of the terminal
#   NPROC    processes (GPUs) per node; >1 launches main.py, attack_tbfa.py and attack_talbf.py
#            through torchrun (attack_bfa.py and report.py always run as one process)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
DEVICE="${DEVICE:-auto}"
DRY_RUN="${DRY_RUN:-0}"
QUIET="${QUIET:-0}"
NPROC="${NPROC:-1}"
LOG="${LOG:-/dev/null}"
TIMINGS="${TIMINGS:-}"
STEP="${STEP:-}"

# An absolute path for $1, relative paths taken from the caller's working directory (call it
# before `cd "$ROOT"`).
abspath() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$PWD/$1" ;;
  esac
}

# enter_root: DATA_DIR ($ROOT/data) and OUT_ROOT ($ROOT/runs/paper) as absolute paths, relative
# ones taken from the caller's working directory, then `cd "$ROOT"`.
enter_root() {
  DATA_DIR="$(abspath "${DATA_DIR:-$ROOT/data}")"
  OUT_ROOT="$(abspath "${OUT_ROOT:-$ROOT/runs/paper}")"
  cd "$ROOT"
}

# out_dir DIR: the script's output folder OUT=DIR, created (and its step timings recorded in
# DIR/timings.tsv) unless DRY_RUN=1.
out_dir() {
  OUT="$1"
  [ "$DRY_RUN" = "1" ] || { mkdir -p "$OUT"; TIMINGS="$OUT/timings.tsv"; }
}

# Run (or with DRY_RUN=1 print) one command; with $TIMINGS set, append "step<TAB>wall seconds
# <TAB>CPU seconds (user + system, when /usr/bin/time exists)<TAB>command" to it.
run_cmd() {
  if [ "$DRY_RUN" = "1" ]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  local t0 t1 status=0 cpu="" timer=()
  local cpu_file="${TIMINGS:-/dev/null}.cpu"
  if [ -n "$TIMINGS" ] && [ -x /usr/bin/time ]; then
    timer=(/usr/bin/time -f '%U %S' -o "$cpu_file")
  fi
  t0=$(date +%s)
  if [ "$QUIET" = "1" ]; then
    printf '+ %s\n' "$*" >> "$LOG"
    "${timer[@]}" "$@" >> "$LOG" 2>&1 || status=$?
    if [ "$status" != 0 ]; then
      echo "command failed (exit $status): $*" >&2
      echo "last lines of $LOG:" >&2
      tail -n 25 "$LOG" >&2
      return "$status"
    fi
  else
    echo "+ $*"
    "${timer[@]}" "$@" || return $?
  fi
  t1=$(date +%s)
  if [ -n "$TIMINGS" ]; then
    if [ "${#timer[@]}" -gt 0 ] && [ -f "$cpu_file" ]; then
      cpu="$(awk 'END { printf "%.0f", $1 + $2 }' "$cpu_file")"
      rm -f "$cpu_file"
    fi
    printf '%s\t%s\t%s\t%s\n' "${STEP:-?}" "$((t1 - t0))" "$cpu" "$*" >> "$TIMINGS"
  fi
}

# run_py SCRIPT ARGS...: plain python, or torchrun with NPROC processes (one GPU each): main.py
# shards the global batch, the attack scripts share out the campaign's experiments.
run_py() {
  if [ "$NPROC" -gt 1 ]; then
    run_cmd torchrun --standalone "--nproc_per_node=$NPROC" "$@"
  else
    run_cmd "$PY" "$@"
  fi
}

main_py() {
  run_py main.py "$@"
}

# Training flags of a model label of the paper's tables (docs/algorithms.md section 4): vanilla, pc,
# ocm<L>, ocm<L>_pc, mixup, manifold_mixup, binarized. PC_LAMBDA sets the clustering strength.
model_flags() {
  local label="$1" lam="${PC_LAMBDA:-1e-3}" length
  length="${label#ocm}"
  length="${length%_pc}"
  case "$label" in
    vanilla) ;;
    pc) echo "--clustering --lambda_coeff $lam" ;;
    ocm[0-9]*_pc) echo "--ocm --code_length $length --output_act tanh --clustering --lambda_coeff $lam" ;;
    ocm[0-9]*) echo "--ocm --code_length $length --output_act tanh" ;;
    mixup) echo "--mixup --mixup-alpha 1" ;;
    manifold_mixup) echo "--manifold-mixup --manifold-mixup-alpha 2" ;;
    binarized) echo "--arch resnet20_bin --bits 1" ;;
    *) echo "unknown model label '$label' (vanilla, pc, ocm<L>, ocm<L>_pc, mixup, manifold_mixup," \
            "binarized)" >&2
       return 2 ;;
  esac
}

# train RUN_DIR MAIN_PY_FLAGS...: train into RUN_DIR, resume an interrupted run, or skip a
# finished one (RUN_DIR/train.done; delete it to train again).
train() {
  local run="$1"
  shift
  if [ "$DRY_RUN" != "1" ] && [ -f "$run/train.done" ]; then
    echo "   $run: already trained (delete $run/train.done to train again)"
    return 0
  fi
  if [ "$DRY_RUN" != "1" ] && [ -f "$run/checkpoint.pth.tar" ]; then
    main_py --resume "$run/checkpoint.pth.tar" --data_dir "$DATA_DIR" --device "$DEVICE" \
      --no-progress
  else
    main_py "$@" --data_dir "$DATA_DIR" --device "$DEVICE" --no-progress --outdir "$run"
  fi
  [ "$DRY_RUN" = "1" ] || touch "$run/train.done"
}

# tbfa RUN_DIR FLAGS...: stealthy T-BFA on RUN_DIR/model_best.pth.tar with ASR / PA-ACC every
# $CURVE_EVERY flips (default 1; supplement Figures 1 and 2; 0 records no curve); results in
# RUN_DIR/attack_tbfa. Each curve point evaluates PA-ACC on D_pa (nearly the whole test set).
tbfa() {
  local run="$1"
  shift
  run_py attack_tbfa.py --checkpoint "$run/model_best.pth.tar" --data_dir "$DATA_DIR" \
    --device "$DEVICE" --no-progress --curve-every "${CURVE_EVERY:-1}" "$@"
}

# talbf RUN_DIR FLAGS...: stealthy TA-LBF; results in RUN_DIR/attack_talbf.
talbf() {
  local run="$1"
  shift
  run_py attack_talbf.py --checkpoint "$run/model_best.pth.tar" --data_dir "$DATA_DIR" \
    --device "$DEVICE" --no-progress "$@"
}

# bfa RUN_DIR RESULTS_DIR FLAGS...: an untargeted BFA (or, with --random_bfa, random-flip)
# campaign; run again, it continues (the runs already in RESULTS_DIR are not repeated).
bfa() {
  local run="$1" results="$2"
  shift 2
  run_cmd "$PY" attack_bfa.py --checkpoint "$run/model_best.pth.tar" --data_dir "$DATA_DIR" \
    --device "$DEVICE" --no-progress --results "$results" "$@"
}

# report OUT_DIR LABEL=FOLDER... [report.py flags]: the table and the figures.
report() {
  local out="$1"
  shift
  run_cmd "$PY" report.py --out "$out" "$@"
}

# paper_pipeline: train every model of $MODELS on $DATASET ($ARCH, $BITS bits, $EPOCHS epochs,
# the papers' recipe: main.py's defaults, docs/algorithms.md section 4), attack each with stealthy T-BFA
# ($TBFA_AVGS repetitions of the protocol's pairs, curves after every flip, plus $TBFA_FLAGS)
# and stealthy TA-LBF ($TALBF_ATTACKS attacks; 0 skips it), and write the report into
# $OUT/report. Models live in $OUT/<label>.
paper_pipeline() {
  local m flags_text specs=()
  local -a flags extra_train tbfa_extra
  read -r -a extra_train <<< "${TRAIN_FLAGS:-}"
  read -r -a tbfa_extra <<< "${TBFA_FLAGS:-}"
  for m in $MODELS; do
    echo "== train $m: $DATASET, $ARCH, $BITS-bit, $EPOCHS epochs =="
    flags_text="$(model_flags "$m")"
    read -r -a flags <<< "$flags_text"
    STEP="train $m" train "$OUT/$m" --dataset "$DATASET" --arch "$ARCH" --bits "$BITS" \
      -e "$EPOCHS" --seed "$SEED" --workers "$WORKERS" "${flags[@]}" "${extra_train[@]}"
  done
  for m in $MODELS; do
    echo "== stealthy T-BFA on $m ($TBFA_AVGS repetitions of the protocol's pairs) =="
    STEP="tbfa $m" tbfa "$OUT/$m" --avgs "$TBFA_AVGS" --workers "$WORKERS" "${tbfa_extra[@]}"
    if [ "$TALBF_ATTACKS" != "0" ]; then
      echo "== stealthy TA-LBF on $m ($TALBF_ATTACKS attacks) =="
      STEP="talbf $m" talbf "$OUT/$m" --n-attacks "$TALBF_ATTACKS" --workers "$WORKERS"
    fi
  done
  for m in $MODELS; do specs+=("$m=$OUT/$m"); done
  echo "== report: $OUT/report =="
  local attacks=tbfa,talbf
  [ "$TALBF_ATTACKS" != "0" ] || attacks=tbfa
  STEP=report report "$OUT/report" "${specs[@]}" --attacks "$attacks" --title "$TITLE"
}

# paper_setup DATASET ARCH MODELS TALBF_ATTACKS: the paper pipelines' paths and defaults (the
# environment their scripts document): DATA_DIR ($ROOT/data) and OUT_ROOT ($ROOT/runs/paper),
# relative ones taken from the caller's working directory; ARCH, MODELS and TALBF_ATTACKS (default
# the arguments), BITS (8), EPOCHS (160), SEED (0), WORKERS (4), TBFA_AVGS (5); the models go to
# OUT=$OUT_ROOT/DATASET. Leaves the shell in $ROOT; paper_pipeline runs the rest (after TITLE).
paper_setup() {
  enter_root
  DATASET="$1"
  ARCH="${ARCH:-$2}"
  BITS="${BITS:-8}"
  EPOCHS="${EPOCHS:-160}"
  SEED="${SEED:-0}"
  WORKERS="${WORKERS:-4}"
  MODELS="${MODELS:-$3}"
  TBFA_AVGS="${TBFA_AVGS:-5}"
  TALBF_ATTACKS="${TALBF_ATTACKS:-$4}"
  out_dir "$OUT_ROOT/$DATASET"
}

# cifar10_pipeline DEFAULT_MODELS: the OCM paper's CIFAR-10 pipeline (8-bit ResNet-20, 1000
# TA-LBF attacks; paper_setup's environment, MODELS defaulting to DEFAULT_MODELS) into
# $OUT_ROOT/cifar10.
cifar10_pipeline() {
  paper_setup cifar10 resnet20_quan "$1" 1000
  TITLE="CIFAR-10, $BITS-bit ResNet-20"
  paper_pipeline
}
