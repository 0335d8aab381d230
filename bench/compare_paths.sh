#!/usr/bin/env bash
# Metrics of the fast training path against the original-style path on the demo's synthetic
# DFC2020 set: dual ResNet-18, SupCon+CE, 6 epochs from random initialisation, several seeds.
#   fast:           augmented views made on the device in batches, one encoder pass per view
#   original style: per-sample augmentation in the DataLoader, a third pass for CE, fp32 NCHW
#   fast bf16:      the fast path under bf16 autocast, as on CUDA (only with AMP=1)
# On CUDA the fast path adds bf16 and channels_last by default; this script pins both off for
# the first two columns so that they differ only in what the path changes.
#   bash bench/compare_paths.sh            # SEEDS="0 1 2 3 4 5" by default, two runs at a time
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-demo}
SEEDS=${SEEDS:-0 1 2 3 4 5}
JOBS=${JOBS:-2}
RUNS="$OUT/runs/compare_paths"
if [ ! -d "$OUT/data/dfc2020" ]; then
  $PYTHON synthetic_data.py dfc2020 "$OUT/data/dfc2020" --n 128 --n-test 64 --size 96 --seed 0
fi
rm -rf "$RUNS"
mkdir -p "$RUNS/logs"

run() {  # column name seed flags...
  local column=$1 name=$2 seed=$3
  shift 3
  OMP_NUM_THREADS=1 $PYTHON dfc_finetune.py --data_root "$OUT/data/dfc2020" --arch resnet18 --finetune --use_sup_con \
    --crop 64 --epochs 6 --batch_size 8 --lr 3e-4 --classifier_lr 3e-4 --eval_every 0 --device cpu --seed "$seed" \
    --name "$name" --save_path "$RUNS/$column-seed$seed" "$@" > "$RUNS/logs/$column-seed$seed.log" 2>&1
}
# column|name|seed|flags; the column prefix keeps the summary's columns in this order.
jobs_list=()
for seed in $SEEDS; do
  jobs_list+=("1-fast|fast|$seed|--no-amp --no-channels_last")
  jobs_list+=("2-original|original style|$seed|--no-amp --no-channels_last --augment_on loader --separate_ce_pass")
  if [ "${AMP:-0}" = 1 ]; then jobs_list+=("3-fast-bf16|fast bf16|$seed|--amp --no-channels_last"); fi
done
start=$(date +%s)
for job in "${jobs_list[@]}"; do
  IFS='|' read -r column name seed flags <<< "$job"
  # shellcheck disable=SC2086  # flags are word lists
  run "$column" "$name" "$seed" $flags &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
done
wait
find "$RUNS" -name "*.pt" -delete
failed=0
for job in "${jobs_list[@]}"; do
  IFS='|' read -r column name seed _ <<< "$job"
  if [ ! -f "$RUNS/$column-seed$seed/results.json" ]; then
    echo "compare_paths: $name, seed $seed failed; log: $RUNS/logs/$column-seed$seed.log" >&2
    failed=1
  fi
done
[ "$failed" = 0 ] || exit 1
echo "${#jobs_list[@]} runs in $(( $(date +%s) - start )) s"
$PYTHON summarize.py "$RUNS"
