#!/usr/bin/env bash
# The SEN12MS pre-training of the dual ResNet-50 (SSLTransformerRS, train_resnet_backbone.py):
# cross-modal NT-Xent (temperature 0.07) between the S1 and S2 projections of random 128 px crops,
# all four seasons, batch 200, Adam lr 3e-5, weight decay 1e-4, 201 epochs, the original's
# schedule (constant for 11 epochs, then its slow cosine), seed 42 as the original's config.
# The run folder holds checkpoint-epoch0.pth, checkpoint-epoch25.pth, ... checkpoint-epoch200.pth (after
# those 0-based epochs, as the original). SSLTransformerRS's own DFC2020 scripts read the one after
# epoch 100 (SupCon_SSL's dfc_finetune.sh names only "mymodelpath.pth"):
# WEIGHTS=$OUT/checkpoint-epoch100.pth bash dfc_finetune.sh (checkpoint.pth is the last one).
#
#   DATA=/data/sen12ms bash sen12ms_pretrain.sh
#
# Environment (defaults in brackets):
#   DATA      folder holding ROIs1158_spring, ROIs1868_summer, ROIs1970_fall, ROIs2017_winter [data/sen12ms]
#   OUT       the run folder [runs/sen12ms/pretrain-resnet50]
#   DEVICE    cuda, cuda:1, cpu [cuda if available]
#   FAST      1: --amp (bf16 autocast; NOT the original's float32; docs/differences.md) [0]
#   EXTRA     further flags, e.g. "--resume runs/...", "--epochs 20" []
#   PYTHON    interpreter [the repository's .venv/bin/python if it exists, else python]
#
# The same on 8 GPUs of one machine: 8 x 25 = the published batch of 200; the loss contrasts the
# global batch (add --sync_bn for batch norm over it too; the original normalised per GPU batch):
#   torchrun --standalone --nproc_per_node 8 sen12ms_pretrain.py --data_root "$DATA" \
#     --arch resnet50 --crop 128 --batch_size 25 --epochs 201 --lr 3e-5 --weight_decay 1e-4 \
#     --temperature 0.07 --seed 42 --save_path "$OUT"
# On 2 machines of 4 GPUs each (run on both; HOST is the first machine's address):
#   torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id sen12ms \
#     sen12ms_pretrain.py --data_root "$DATA" --arch resnet50 --crop 128 --batch_size 25 --epochs 201 \
#     --lr 3e-5 --weight_decay 1e-4 --temperature 0.07 --seed 42 --save_path "$OUT"
# Rank 0 (on the machine that gets it) writes the run folder; --resume needs it there.
set -euo pipefail
source "$(dirname "$0")/recorded.sh"
DATA=${DATA:-$HERE/data/sen12ms}
OUT=${OUT:-$HERE/runs/sen12ms/pretrain-resnet50}
fast=()
[ "${FAST:-0}" = 1 ] && fast=(--amp)

$PYTHON "$HERE/sen12ms_pretrain.py" --data_root "$DATA" --arch resnet50 --crop 128 --batch_size 200 --epochs 201 \
  --lr 3e-5 --weight_decay 1e-4 --temperature 0.07 --schedule original --warmup_epochs 10 --seed 42 \
  "${device[@]}" "${fast[@]}" --save_path "$OUT" ${EXTRA:-}
