#!/usr/bin/env bash
# Metrics of the two places cross-entropy can read its features from, on the demo's synthetic
# DFC2020 set: dual ResNet-18 from random initialisation, SupCon+CE, 6 epochs, six seeds.
#   separate: a second encoder pass over the originals feeds CE, as the original (the default)
#   joint:    CE reads the original half of the joint (augmented, original) pass; a third less
#             compute, other batch-norm batch statistics for CE's features
# float32 and NCHW for both (--no-amp --no-channels_last), so that they differ only in --ce_from.
# Two runs at a time, one torch thread each; then AA and OA of the last epoch, mean ± std over
# seeds (summarize.py), per seed, and the paired difference joint - separate.
#   bash bench/compare_paths.sh        # about 10 minutes on 2 CPU cores
# Environment: PYTHON (default .venv/bin/python), OUT (default demo/compare_paths: data/ and
# runs/ under it; demo.sh leaves it alone), SEEDS (default "0 1 2 3 4 5"), JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-demo/compare_paths}
SEEDS=${SEEDS:-0 1 2 3 4 5}
JOBS=${JOBS:-2}
DATA="$OUT/data/dfc2020"
RUNS="$OUT/runs"
rm -rf "$OUT"  # the data writer adds to existing folders, and run folders are refused when full: start clean
mkdir -p "$RUNS/logs"
start=$(date +%s)
$PYTHON synthetic_data.py dfc2020 "$DATA" --n 128 --n_test 64 --size 96 --seed 0

run() {  # ce_from seed
  OMP_NUM_THREADS=1 $PYTHON dfc_finetune.py --data_root "$DATA" --arch resnet18 --finetune --use_sup_con \
    --crop 64 --eval_crop 64 --epochs 6 --batch_size 8 --lr 3e-4 --head_lr 3e-4 --eval_every 0 \
    --device cpu --no-amp --no-channels_last --ce_from "$1" --seed "$2" --name "ce_from $1" \
    --save_path "$RUNS/$1-seed$2" > "$RUNS/logs/$1-seed$2.log" 2>&1
}
for seed in $SEEDS; do
  for ce_from in separate joint; do
    run "$ce_from" "$seed" &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  done
done
wait
find "$RUNS" -name "*.pt" -delete
failed=0
for seed in $SEEDS; do
  for ce_from in separate joint; do
    if [ ! -f "$RUNS/$ce_from-seed$seed/results.json" ]; then
      tail -n 20 "$RUNS/logs/$ce_from-seed$seed.log" >&2
      echo "compare_paths: ce_from $ce_from, seed $seed failed; log: $RUNS/logs/$ce_from-seed$seed.log" >&2
      failed=1
    fi
  done
done
[ "$failed" = 0 ] || exit 1
echo "compare_paths: $(( 2 * $(wc -w <<< "$SEEDS") )) runs in $(( $(date +%s) - start )) s"
echo
$PYTHON summarize.py "$RUNS"
echo
RUNS="$RUNS" SEEDS="$SEEDS" $PYTHON - <<'EOF'
"""Per-seed AA and OA of the last epoch and the paired difference joint - separate."""
import json
import os
import statistics

runs, seeds = os.environ["RUNS"], os.environ["SEEDS"].split()
last = {(c, s): json.load(open(f"{runs}/{c}-seed{s}/results.json"))["last"] for c in ("separate", "joint") for s in seeds}


def mean_sd(values):
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


print("| seed | AA separate | AA joint | AA joint - separate | OA separate | OA joint | OA joint - separate |")
print("|---:|---:|---:|---:|---:|---:|---:|")
diffs = {"AA": [], "OA": []}
for s in seeds:
    cells = []
    for metric in ("AA", "OA"):
        a, b = last["separate", s][metric], last["joint", s][metric]
        diffs[metric].append(b - a)
        cells += [f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"]
    print(f"| {s} | " + " | ".join(cells) + " |")
print(f"| paired difference, mean ± sd | | | {mean_sd(diffs['AA'])} | | | {mean_sd(diffs['OA'])} |")
EOF
