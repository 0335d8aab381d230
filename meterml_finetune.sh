#!/usr/bin/env bash
# The METER-ML fine-tuning experiments of the original work (Table III), as its recorded script
# runs them: dual SmallAlexNet pre-trained on METER-ML, s1s2_fused, --dont_include_negatives,
# SGD lr 0.01, batch 32, 121 epochs, evaluation when the 0-based epoch is a multiple of 10 or
# above 79 (and after the last); CE, then SupCon+CE WITHOUT augmentation (one view per modality),
# one run each per seed. Table III's "average" is the mean over the six facility classes (AA).
#
#   DATA=/data/meter-ml WEIGHTS=SmallAlexNet.pth bash meterml_finetune.sh
#
# The original README describes SupCon with (augmented, original) views; that variant:
#   SUPCON_EXTRA=--use_augs bash meterml_finetune.sh
#
# Environment (defaults in brackets):
#   DATA          METER-ML root with train_dataset.geojson, val_dataset.geojson and the images [data/meter-ml]
#   WEIGHTS       pre-trained encoder, released SmallAlexNet layout, or "random" [checkpoints/SmallAlexNet.pth]
#   DEVICE        cuda, cuda:1, cpu [cuda if available]
#   SEEDS         space-separated seeds [0 1 2 3 4]
#   OUT           parent folder of the run folders [runs/meterml]
#   EXTRA         further flags for every run, e.g. "--epochs 10" []
#   SUPCON_EXTRA  further flags for the SupCon+CE runs only, e.g. "--use_augs" []
#   PYTHON        interpreter [.venv/bin/python if it exists, else python]
# Afterwards: python summarize.py $OUT
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/meter-ml}
WEIGHTS=${WEIGHTS:-checkpoints/SmallAlexNet.pth}
SEEDS=${SEEDS:-0 1 2 3 4}
OUT=${OUT:-runs/meterml}
if [ -z "${PYTHON:-}" ]; then [ -x .venv/bin/python ] && PYTHON=.venv/bin/python || PYTHON=python; fi
device=()
[ -n "${DEVICE:-}" ] && device=(--device "$DEVICE")
common=("$WEIGHTS" --data_root "$DATA" --model dual --scenario s1s2_fused --eval_mode finetune --dont_include_negatives
        --epochs 121 --batch_size 32 --lr 0.01 --data_ratio 1.0)

for seed in $SEEDS; do
  $PYTHON meterml_finetune.py "${common[@]}" --seed "$seed" "${device[@]}" \
    --save_path "$OUT/ce-seed$seed" ${EXTRA:-}
  $PYTHON meterml_finetune.py "${common[@]}" --use_sup_con --sup_delta 1.0 --cross_delta 1.0 --seed "$seed" "${device[@]}" \
    --save_path "$OUT/supcon-ce-seed$seed" ${EXTRA:-} ${SUPCON_EXTRA:-}
done
$PYTHON summarize.py "$OUT"
