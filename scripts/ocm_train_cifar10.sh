#!/usr/bin/env bash
# The OCM repository's ocm_train_cifar10.sh: train 8-bit ResNet-20 models with output code
# matching on CIFAR-10 (OCM16 and OCM64, SGD 0.1 stepped, 160 epochs, weight decay 1e-4;
# docs/algorithms.md section 4), evaluate them with stealthy T-BFA (20 pairs x 5, curves after every flip) and
# stealthy TA-LBF (1000 attacks), and write the report (table with published numbers, Figures
# 1 and 2) into $OUT_ROOT/cifar10/report. MODELS="vanilla ocm16 ocm64" adds the baseline;
# scripts/paper_cifar10.sh runs every model of the paper's table.
#
# Usage: DATA_DIR=/data OUT_ROOT=/scratch/ocm bash scripts/ocm_train_cifar10.sh   (any directory)
# Environment: DATA_DIR (data), OUT_ROOT (runs/paper), DEVICE (auto), EPOCHS (160), SEED (0),
#   MODELS (ocm16 ocm64), TBFA_AVGS (5), TALBF_ATTACKS (1000; 0 skips TA-LBF), TBFA_FLAGS,
#   TRAIN_FLAGS, WORKERS (4), PYTHON, DRY_RUN (1 prints the commands).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
cifar10_pipeline "ocm16 ocm64"
