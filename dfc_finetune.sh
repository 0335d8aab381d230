#!/usr/bin/env bash
# The DFC2020 fine-tuning experiments of the original work (Table II): dual ResNet-50
# pre-trained on SEN12MS, fine-tuned on the validation split (986 patches, random 224 px crops),
# evaluated on a 224 px window of each test patch (5,128); Adam lr 1e-5, classifier 3e-6,
# weight decay 1e-3, batch 32, 201 epochs, evaluation when the 0-based epoch is a multiple of 10
# or above 150 (and after the last); CE vs SupCon+CE, one run each per seed.
#
#   DATA=/data/dfc2020 WEIGHTS=DualResnet50.pth bash dfc_finetune.sh
#
# WEIGHTS: the released 'DualResnet50' checkpoint of the original work (linked from
# github.com/bakiuzun/SupCon_SSL; put it in checkpoints/), a checkpoint of sen12ms_pretrain.py,
# or "random" for a randomly initialised network.
#
# Environment (defaults in brackets):
#   DATA      folder holding ROIs0000_validation and ROIs0000_test, or a packed copy [data/dfc2020]
#   WEIGHTS   pre-trained dual ResNet-50 (released layout) or "random" [checkpoints/DualResnet50.pth]
#   DEVICE    cuda, cuda:1, cpu [cuda if available]
#   SEEDS     space-separated seeds [0 1 2 3 4]
#   OUT       parent folder of the run folders [runs/dfc2020]
#   EXTRA     further flags for every run, e.g. "--balanced_class" or "--epochs 20" []
#   PYTHON    interpreter [.venv/bin/python if it exists, else python]
# Afterwards: python summarize.py $OUT
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/dfc2020}
WEIGHTS=${WEIGHTS:-checkpoints/DualResnet50.pth}
SEEDS=${SEEDS:-0 1 2 3 4}
OUT=${OUT:-runs/dfc2020}
if [ -z "${PYTHON:-}" ]; then [ -x .venv/bin/python ] && PYTHON=.venv/bin/python || PYTHON=python; fi
device=()
[ -n "${DEVICE:-}" ] && device=(--device "$DEVICE")
weights=()
[ "$WEIGHTS" != random ] && weights=(--model_path "$WEIGHTS")
common=(--data_root "$DATA" "${weights[@]}" --arch resnet50 --finetune --crop 224 --eval_crop 224
        --epochs 201 --batch_size 32 --lr 1e-5 --classifier_lr 3e-6 --weight_decay 1e-3)

for seed in $SEEDS; do
  $PYTHON dfc_finetune.py "${common[@]}" --seed "$seed" "${device[@]}" \
    --save_path "$OUT/ce-seed$seed" ${EXTRA:-}
  $PYTHON dfc_finetune.py "${common[@]}" --use_sup_con --delta_sup 1.0 --delta_lin 1.0 --seed "$seed" "${device[@]}" \
    --save_path "$OUT/supcon-ce-seed$seed" ${EXTRA:-}
done
$PYTHON summarize.py "$OUT"
