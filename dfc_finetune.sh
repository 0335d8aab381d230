#!/usr/bin/env bash
# The DFC2020 fine-tuning experiments of the original work (Table II): dual ResNet-50
# pre-trained on SEN12MS, trained on the validation split (986 patches, 224 px crops),
# evaluated on the test split (5,128 whole patches); Adam lr 1e-5, classifier 3e-6,
# weight decay 1e-3, batch 32, 201 epochs; CE vs SupCon+CE, one run per seed.
#
#   DATA=/data/dfc2020 WEIGHTS=DualResnet50.pth bash dfc_finetune.sh
#
# Environment (defaults in brackets):
#   DATA      folder holding ROIs0000_validation and ROIs0000_test [data/dfc2020]
#   WEIGHTS   pre-trained dual ResNet-50, released layout [checkpoints/DualResnet50.pth]
#   DEVICE    cuda, cuda:1, cpu [cuda if available]
#   SEEDS     space-separated seeds [0 1 2 3 4]
#   OUT       parent folder of the run folders [runs/dfc2020]
#   EXTRA     further flags for every run, e.g. "--balanced_class" or "--epochs 20" []
# Afterwards: python summarize.py $OUT
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/dfc2020}
WEIGHTS=${WEIGHTS:-checkpoints/DualResnet50.pth}
SEEDS=${SEEDS:-0 1 2 3 4}
OUT=${OUT:-runs/dfc2020}
PYTHON=${PYTHON:-python}
device=()
[ -n "${DEVICE:-}" ] && device=(--device "$DEVICE")
common=(--data_root "$DATA" --model_path "$WEIGHTS" --arch resnet50 --finetune --crop 224
        --epochs 201 --batch_size 32 --lr 1e-5 --classifier_lr 3e-6 --weight_decay 1e-3)

for seed in $SEEDS; do
  $PYTHON dfc_finetune.py "${common[@]}" --seed "$seed" "${device[@]}" \
    --save_path "$OUT/ce-seed$seed" ${EXTRA:-}
  $PYTHON dfc_finetune.py "${common[@]}" --use_sup_con --delta_sup 1.0 --delta_lin 1.0 --seed "$seed" "${device[@]}" \
    --save_path "$OUT/supcon-ce-seed$seed" ${EXTRA:-}
done
$PYTHON summarize.py "$OUT"
