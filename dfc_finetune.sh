#!/usr/bin/env bash
# The DFC2020 fine-tuning experiments of the original work (Table II): dual ResNet-50 pre-trained
# on SEN12MS, trained on the validation split (986 patches, random 224 px crops), evaluated on a
# 224 px window of each test patch (5,128); Adam lr 1e-5, weight decay 1e-3, batch 32, 201 epochs,
# evaluation when the 0-based epoch is a multiple of 10 or above 150 (and after the last).
#
# In this order, each configuration for every seed before the next:
#   1. the original's recorded invocation (its dfc_finetune.sh: --use_sup_con --delta_sup 1.0
#      --delta_lin 1.0 --epochs 201 --batch_size 32, no --finetune), and its CE baseline: the
#      backbones frozen (in training mode, as the original), only the classifier trains, at 1e-5.
#      Rows "frozen CE" and "frozen SupCon+CE" of the summary.
#   2. the fine-tuned variant (--finetune: everything trains, the classifier at 3e-6), which the
#      released FineTunedDualResnet50 points to. Rows "fine-tuned CE" and "fine-tuned SupCon+CE".
#
#   DATA=/data/dfc2020 WEIGHTS=checkpoints/DualResnet50.pth bash dfc_finetune.sh
#
# WEIGHTS: the released 'DualResnet50' checkpoint of the original work (linked from
# github.com/bakiuzun/SupCon_SSL; its dfc_finetune.sh names only "mymodelpath.pth"), a checkpoint
# of sen12ms_pretrain.py (SSLTransformerRS's own DFC2020 scripts read the one after epoch 100:
# RUN/checkpoint-epoch100.pth), or "random" (a frozen random backbone: a lower bound, warned about).
#
# Environment (defaults in brackets):
#   DATA      folder holding ROIs0000_validation and ROIs0000_test, or a packed copy [data/dfc2020]
#   WEIGHTS   pre-trained dual ResNet-50 (released layout) or "random" [checkpoints/DualResnet50.pth]
#   DEVICE    cuda, cuda:1, cpu [cuda if available]
#   SEEDS     space-separated seeds [0 1 2 3 4]
#   OUT       parent folder of the run folders [runs/dfc2020]
#   VARIANTS  1: also the fine-tuned runs (step 2); 0: only the recorded invocation [1]
#   FAST      1: the speed options, --amp (bf16 autocast) --ce_from joint; NOT the original's
#             numerics or step (docs/differences.md) [0: float32 and the original's step]
#   EXTRA     further flags for every run, e.g. "--balanced_class" or "--epochs 20" []
#   PYTHON    interpreter [the repository's .venv/bin/python if it exists, else python]
# Afterwards: .venv/bin/python summarize.py $OUT
set -euo pipefail
source "$(dirname "$0")/recorded.sh"
DATA=${DATA:-$HERE/data/dfc2020}
WEIGHTS=${WEIGHTS:-$HERE/checkpoints/DualResnet50.pth}
OUT=${OUT:-$HERE/runs/dfc2020}
weights=()
[ "$WEIGHTS" != random ] && weights=(--model_path "$WEIGHTS")
fast=()
[ "${FAST:-0}" = 1 ] && fast=(--amp --ce_from joint)
# The original's command line; every other flag keeps its default, the original's setting.
recorded=(--data_root "$DATA" "${weights[@]}" --epochs 201 --batch_size 32)
supcon=(--use_sup_con --delta_sup 1.0 --delta_lin 1.0)

runs dfc_finetune.py frozen-ce
runs dfc_finetune.py frozen-supcon-ce "${supcon[@]}"
if [ "${VARIANTS:-1}" = 1 ]; then
  runs dfc_finetune.py finetuned-ce --finetune --classifier_lr 3e-6
  runs dfc_finetune.py finetuned-supcon-ce "${supcon[@]}" --finetune --classifier_lr 3e-6
fi
$PYTHON "$HERE/summarize.py" "$OUT"
