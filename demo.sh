#!/usr/bin/env bash
# The whole pipeline on small synthetic data, sized for 2 CPU cores (4-5 minutes): METER-ML
# pre-training and fine-tuning (s1, s2, s1s2_fused; CE and SupCon+CE; two seeds), SEN12MS
# pre-training of a dual ResNet-18 and its fine-tuning on DFC2020 (CE and SupCon+CE; two seeds),
# the embeddings of one seed, a synthetic S1 / S2 scene classified into a map (predict.py), then
# the summary tables and a report. At the end the checkpoints are deleted but the DFC2020 runs'
# last.pt (their weights, ~90 MB each), kept for a prediction from them.
# The numbers come from synthetic data: they show that the pipeline works, not the published
# results. Runs are short, so learning rates are higher than the published ones (docs/testing.md).
#   bash demo.sh          (make demo builds .venv first)
# Environment: PYTHON [.venv/bin/python], OUT [demo], SEEDS [0 1].
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-$HERE/.venv/bin/python}
OUT=${OUT:-$HERE/demo}
SEEDS=${SEEDS:-0 1}
LOGS=$OUT/runs/logs
rm -rf "$OUT/runs" "$OUT/data" "$OUT/report"  # the writers add to existing folders and runs refuse a used folder: start clean
mkdir -p "$LOGS"
start=$(date +%s)
echo "demo: every run logs to $LOGS/; the results tables come at the end, the report in $OUT/report/report.md"

step() { echo "[$(( $(date +%s) - start )) s] $*"; }

# run NAME FOLDER COMMAND...: COMMAND with its output in $LOGS/NAME.log; one line when it ends
# (its time, and the AA of its last evaluation from FOLDER/results.json, or the kNN accuracies of
# an embedding from FOLDER/embedding.json); the log's end when it fails.
run() {
  local name=$1 folder=$2 began
  shift 2
  began=$(date +%s)
  if ! "$@" > "$LOGS/$name.log" 2>&1; then
    tail -n 30 "$LOGS/$name.log" >&2
    echo "demo: $name failed; its log: $LOGS/$name.log" >&2
    return 1
  fi
  echo "  $name: $(( $(date +%s) - began )) s$("$PYTHON" -c "
import json, os, sys
folder = sys.argv[1]
if os.path.isfile(os.path.join(folder, 'embedding.json')):
    knn = json.load(open(os.path.join(folder, 'embedding.json')))['knn_accuracy']
    print(', kNN S1 {s1:.1f} %, S2 {s2:.1f} %, S1->S2 {s1_to_s2:.1f} %, S2->S1 {s2_to_s1:.1f} %'.format(**knn))
else:
    last = json.load(open(os.path.join(folder, 'results.json'))).get('last')
    print(f', AA {last[\"AA\"]:.1f} %' if last and last.get('AA') is not None else '')" "$folder")"
}

# Commands in processes of their own, one torch thread each: on 2 cores that beats one run on 2 threads.
in_parallel() {
  local pids=() command failed=0
  for command in "$@"; do
    (export OMP_NUM_THREADS=1; $command) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return "$failed"
}
per_seed() {
  local seed commands=()
  for seed in $SEEDS; do commands+=("$1 $seed"); done
  in_parallel "${commands[@]}"
}

step "writing synthetic METER-ML, DFC2020 and SEN12MS sets"
"$PYTHON" "$HERE/synthetic_data.py" meterml "$OUT/data/meter-ml" --n 112 --val_fraction 0.5 --seed 0 > "$LOGS/data.log"
"$PYTHON" "$HERE/synthetic_data.py" dfc2020 "$OUT/data/dfc2020" --n 96 --n_test 64 --size 64 --seed 0 >> "$LOGS/data.log"
"$PYTHON" "$HERE/synthetic_data.py" sen12ms "$OUT/data/sen12ms" --n 32 --size 64 --seed 0 >> "$LOGS/data.log"

step "pre-training: a shared-trunk SmallAlexNet on METER-ML S1 + S2 pairs (NT-Xent), a dual ResNet-18 on SEN12MS (cross-modal NT-Xent)"
meterml_pretrain() {
  run meterml-pretrain "$OUT/runs/pretrain" "$PYTHON" "$HERE/meterml_pretrain.py" --data_root "$OUT/data/meter-ml" \
    --arch shared --use_pairs --epochs 1 --batch_size 16 --momentum 0.9 --save_path "$OUT/runs/pretrain"
}
sen12ms_pretrain() {
  run sen12ms-pretrain "$OUT/runs/sen12ms-pretrain" "$PYTHON" "$HERE/sen12ms_pretrain.py" --data_root "$OUT/data/sen12ms" \
    --arch resnet18 --crop 32 --epochs 4 --batch_size 32 --lr 3e-4 --schedule constant --snapshot_every 100 \
    --save_path "$OUT/runs/sen12ms-pretrain"
}
in_parallel meterml_pretrain sen12ms_pretrain

meterml() {
  local seed=$1 scenario
  local common=(--model_path "$OUT/runs/pretrain/encoder.pth" --data_root "$OUT/data/meter-ml" --arch shared --epochs 2
                --batch_size 16 --lr 0.02 --head_lr 1.0 --momentum 0.9 --eval_every 0 --no-save_best --seed "$seed")
  for scenario in s1 s2 s1s2_fused; do
    run "meterml-$scenario-ce-seed$seed" "$OUT/runs/meterml/$scenario-ce-seed$seed" "$PYTHON" "$HERE/meterml_finetune.py" \
      "${common[@]}" --scenario "$scenario" --save_path "$OUT/runs/meterml/$scenario-ce-seed$seed"
  done
  run "meterml-s1s2_fused-supcon-ce-seed$seed" "$OUT/runs/meterml/s1s2_fused-supcon-ce-seed$seed" "$PYTHON" "$HERE/meterml_finetune.py" \
    "${common[@]}" --scenario s1s2_fused --use_sup_con --save_path "$OUT/runs/meterml/s1s2_fused-supcon-ce-seed$seed"
}
step "fine-tuning on METER-ML: s1, s2, s1s2_fused CE and s1s2_fused SupCon+CE, seeds $SEEDS"
per_seed meterml

dfc() {
  local common=(--data_root "$OUT/data/dfc2020" --model_path "$OUT/runs/sen12ms-pretrain/checkpoint.pth" --arch resnet18
                --finetune --crop 32 --eval_crop 32 --epochs 2 --batch_size 8 --lr 3e-4 --head_lr 3e-4 --eval_every 0
                --no-save_best --keep_last weights --seed "$1")
  run "dfc2020-ce-seed$1" "$OUT/runs/dfc2020/ce-seed$1" "$PYTHON" "$HERE/dfc_finetune.py" "${common[@]}" \
    --save_path "$OUT/runs/dfc2020/ce-seed$1"
  run "dfc2020-supcon-ce-seed$1" "$OUT/runs/dfc2020/supcon-ce-seed$1" "$PYTHON" "$HERE/dfc_finetune.py" "${common[@]}" \
    --use_sup_con --save_path "$OUT/runs/dfc2020/supcon-ce-seed$1"
}
step "fine-tuning the SEN12MS-pre-trained dual ResNet-18 on DFC2020: CE and SupCon+CE, seeds $SEEDS"
per_seed dfc

first=${SEEDS%% *}
embed() {
  local name
  for name in "$@"; do
    run "embed-${name/\//-}" "$OUT/runs/$name-seed$first/embedding" \
      "$PYTHON" "$HERE/embed.py" "$OUT/runs/$name-seed$first"
  done
}
step "t-SNE and kNN of the seed-$first s1s2_fused and DFC2020 runs (embed.py)"
in_parallel "embed meterml/s1s2_fused-ce meterml/s1s2_fused-supcon-ce" "embed dfc2020/ce dfc2020/supcon-ce"

step "predicting a synthetic scene of 4 x 4 patches of 64 px with the seed-$first DFC2020 CE run (predict.py)"
"$PYTHON" "$HERE/synthetic_data.py" scene "$OUT/data/scene" --rows 4 --cols 4 --size 64 --seed 0 >> "$LOGS/data.log"
scene=$OUT/data/scene
if ! "$PYTHON" "$HERE/predict.py" "$OUT/runs/dfc2020/ce-seed$first" --s1 "$scene/s1.tif" --s2 "$scene/s2.tif" \
    --truth "$scene/truth.tif" --out "$OUT/runs/scene/map.tif" > "$LOGS/predict.log" 2>&1; then
  tail -n 30 "$LOGS/predict.log" >&2
  echo "demo: predict failed; its log: $LOGS/predict.log" >&2
  exit 1
fi

# The pre-training and METER-ML checkpoints (hundreds of MB of SmallAlexNet weights) are of no further use;
# the DFC2020 runs keep last.pt (their weights: --keep_last weights) for a prediction from them.
deleted=$(find "$OUT/runs" \( -name "*.pt" -o -name "*.pth" \) ! -path "$OUT/runs/dfc2020/*/last.pt" -print -delete \
  | wc -l)
step "done: run folders in $OUT/runs, logs in $LOGS"
echo "demo: deleted the $deleted checkpoints of the pre-training and METER-ML runs; kept last.pt of the DFC2020 runs" \
  "($(du -ch "$OUT"/runs/dfc2020/*/last.pt | tail -n 1 | cut -f1) in $OUT/runs/dfc2020/*/last.pt)," \
  "the weights to predict with"
echo
echo "Results on SYNTHETIC data ($(( $(date +%s) - start )) s on this machine):"
echo
"$PYTHON" "$HERE/summarize.py" "$OUT/runs/meterml" "$OUT/runs/dfc2020" --report "$OUT/report" \
  --maps "$OUT/runs/scene/map.tif"
echo
echo "Report with figures: $OUT/report/report.md"
