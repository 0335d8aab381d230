#!/usr/bin/env bash
# The METER-ML fine-tuning experiments of the original work (Table III): dual SmallAlexNet
# pre-trained on METER-ML, s1s2_fused, --dont_include_negatives, SGD lr 0.01, batch 32, 121 epochs,
# evaluation when the 0-based epoch is a multiple of 10 or above 79 (and after the last).
# Table III's "average" is the mean over the six facility classes (AA).
#
# In this order, each configuration for every seed before the next:
#   1. the original's recorded invocation (its meterml_finetune.sh: --eval_mode finetune --scenario
#      s1s2_fused --dont_include_negatives --model dual --n_epochs 121 --use_sup_con --sup_delta 1.
#      --cross_delta 1. --data_ratio 1. --batch_size 32): SupCon+CE WITHOUT augmentation (one view
#      per modality), and its CE baseline. Rows "s1s2_fused CE" and "s1s2_fused SupCon+CE".
#   2. the variant the original README describes, SupCon+CE with (augmented, original) views
#      (--use_augs: flips and a random resized crop, scale 0.9-1.0). Row "s1s2_fused SupCon+CE aug".
#
#   DATA=/data/meter-ml WEIGHTS=checkpoints/SmallAlexNet.pth bash meterml_finetune.sh
#
# Environment (defaults in brackets):
#   DATA          METER-ML root with train_dataset.geojson, val_dataset.geojson and the images [data/meter-ml]
#   WEIGHTS       pre-trained encoder, released SmallAlexNet layout, or "random" [checkpoints/SmallAlexNet.pth]
#   DEVICE        cuda, cuda:1, cpu [cuda if available]
#   SEEDS         space-separated seeds [0 1 2 3 4]
#   OUT           parent folder of the run folders [runs/meterml]
#   VARIANTS      1: also the augmented SupCon+CE runs (step 2); 0: only the recorded invocation [1]
#   FAST          1: the speed options, --amp (bf16 autocast) --ce_from joint; NOT the original's
#                 numerics or step (docs/differences.md) [0]
#   EXTRA         further flags for every run, e.g. "--epochs 10", or "--train_image_dirs train_images_1"
#                 (the image sets the original's download_all.sh fetched; docs/differences.md) []
#   PYTHON        interpreter [the repository's .venv/bin/python if it exists, else python]
# Afterwards: .venv/bin/python summarize.py $OUT
set -euo pipefail
source "$(dirname "$0")/recorded.sh"
DATA=${DATA:-$HERE/data/meter-ml}
WEIGHTS=${WEIGHTS:-$HERE/checkpoints/SmallAlexNet.pth}
OUT=${OUT:-$HERE/runs/meterml}
fast=()
[ "${FAST:-0}" = 1 ] && fast=(--amp --ce_from joint)
# The original's command line (its --seed 10 becomes each of SEEDS).
recorded=("$WEIGHTS" --data_root "$DATA" --eval_mode finetune --scenario s1s2_fused --dont_include_negatives --model dual
          --n_epochs 121 --data_ratio 1.0 --batch_size 32)
supcon=(--use_sup_con --sup_delta 1.0 --cross_delta 1.0)

runs meterml_finetune.py ce
runs meterml_finetune.py supcon-ce "${supcon[@]}"
if [ "${VARIANTS:-1}" = 1 ]; then
  runs meterml_finetune.py supcon-ce-aug "${supcon[@]}" --use_augs
fi
$PYTHON "$HERE/summarize.py" "$OUT"
