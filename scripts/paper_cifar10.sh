#!/usr/bin/env bash
# The OCM paper's CIFAR-10 table (docs/algorithms.md section 9), end to end: train every model (8-bit
# ResNet-20: vanilla, piecewise clustering, OCM16, OCM64, OCM16 + PC, mixup, manifold mixup)
# with the papers' recipe (SGD 0.1, /10 at 50 % and 75 % of 160 epochs, batch 128; docs/algorithms.md section 4),
# attack each with stealthy T-BFA (20 pairs x 5 repetitions, |D_src| = |D_aux| = 500, ASR and
# PA-ACC after every flip; docs/algorithms.md section 7) and stealthy TA-LBF (1000 attacks; docs/algorithms.md section 8), then write the
# table with the published numbers beside ours and the supplement's Figures 1 and 2 into
# $OUT_ROOT/cifar10/report (report.py).
#
# Usage: DATA_DIR=/data OUT_ROOT=/scratch/ocm bash scripts/paper_cifar10.sh   (any directory)
# Environment: DATA_DIR (data; holds cifar-10-batches-py/), OUT_ROOT (runs/paper), DEVICE
#   (auto), EPOCHS (160), SEED (0), MODELS (the seven labels below), TBFA_AVGS (5),
#   TALBF_ATTACKS (1000; 0 skips TA-LBF), TBFA_FLAGS / TRAIN_FLAGS (extra flags, e.g.
#   "--full-gradient"), WORKERS (4), PYTHON, DRY_RUN (1 prints the commands).
# Relative paths are taken from the current directory. Every step can be repeated: finished
# trainings and attack experiments are skipped, interrupted ones continue.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
cifar10_pipeline "vanilla pc ocm16 ocm64 ocm16_pc mixup manifold_mixup"
