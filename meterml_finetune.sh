#!/usr/bin/env bash
# The METER-ML fine-tuning experiments of the original work (Table III): dual SmallAlexNet
# encoder pre-trained on METER-ML, s1s2_fused, CE vs SupCon+CE, SGD lr 0.01, batch 32,
# 121 epochs, evaluation every 10 epochs and every epoch after 79, one run per seed.
#
#   DATA=/data/meter-ml WEIGHTS=SmallAlexNet.pth bash meterml_finetune.sh
#
# Environment (defaults in brackets):
#   DATA      METER-ML root with train_dataset.geojson, val_dataset.geojson and the images [data/meter-ml]
#   WEIGHTS   pre-trained encoder, released SmallAlexNet layout, or "random" [checkpoints/SmallAlexNet.pth]
#   DEVICE    cuda, cuda:1, cpu [cuda if available]
#   SEEDS     space-separated seeds [0 1 2 3 4]
#   OUT       parent folder of the run folders [runs/meterml]
#   EXTRA     further flags for every run, e.g. "--scenario s1s2 --epochs 10" []
# Afterwards: python summarize.py $OUT
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/meter-ml}
WEIGHTS=${WEIGHTS:-checkpoints/SmallAlexNet.pth}
SEEDS=${SEEDS:-0 1 2 3 4}
OUT=${OUT:-runs/meterml}
PYTHON=${PYTHON:-python}
device=()
[ -n "${DEVICE:-}" ] && device=(--device "$DEVICE")

for seed in $SEEDS; do
  # CE baseline: fused head, no augmentation.
  $PYTHON meterml_finetune.py "$WEIGHTS" --data_root "$DATA" --model dual --scenario s1s2_fused \
    --eval_mode finetune --epochs 121 --batch_size 32 --lr 0.01 --seed "$seed" "${device[@]}" \
    --save_path "$OUT/ce-seed$seed" ${EXTRA:-}
  # The method: SupCon across both modalities + CE, on (augmented, original) views.
  $PYTHON meterml_finetune.py "$WEIGHTS" --data_root "$DATA" --model dual --scenario s1s2_fused \
    --eval_mode finetune --use_augs --use_sup_con --sup_delta 1.0 --cross_delta 1.0 \
    --epochs 121 --batch_size 32 --lr 0.01 --seed "$seed" "${device[@]}" \
    --save_path "$OUT/supcon-ce-seed$seed" ${EXTRA:-}
done
$PYTHON summarize.py "$OUT"
