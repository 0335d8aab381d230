#!/usr/bin/env bash
# The whole pipeline on small synthetic data, sized for a 2-core CPU (under 10 minutes):
# METER-ML pre-training, fine-tuning (s1, s2, s1s2_fused; CE and SupCon+CE; two seeds), SEN12MS
# pre-training of a dual ResNet-18, its fine-tuning on DFC2020 from random and pre-trained weights
# (CE and SupCon+CE; two seeds), embeddings of one seed, then the summary tables and a report.
# The numbers come from synthetic data: they show that the pipeline works, not the published
# results. Runs are short, so learning rates are higher than the published ones (see README).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-demo}
SEEDS=${SEEDS:-0 1}
rm -rf "$OUT/runs" "$OUT/data" "$OUT/report"  # the writers add to existing folders and runs refuse a used folder: start clean
mkdir -p "$OUT/runs/logs"
start=$(date +%s)

step() { echo "[$(( $(date +%s) - start )) s] $*"; }

# Runs one command per seed concurrently, one torch thread each (on 2 cores that beats one run
# on 2 threads by about a third); each seed's output goes to its log, shown only on failure.
per_seed() {
  local name=$1 pids=() seed
  for seed in $SEEDS; do
    (export OMP_NUM_THREADS=1; "$name" "$seed") > "$OUT/runs/logs/$name-seed$seed.log" 2>&1 &
    pids+=($!)
  done
  for seed in $SEEDS; do
    if ! wait "${pids[0]}"; then
      tail -n 30 "$OUT/runs/logs/$name-seed$seed.log" >&2
      echo "demo: $name, seed $seed failed; full log in $OUT/runs/logs/$name-seed$seed.log" >&2
      exit 1
    fi
    pids=("${pids[@]:1}")
  done
}

step "writing synthetic METER-ML and DFC2020 sets"
$PYTHON synthetic_data.py meterml "$OUT/data/meter-ml" --n 160 --val_fraction 0.4 --seed 0
$PYTHON synthetic_data.py dfc2020 "$OUT/data/dfc2020" --n 128 --n_test 64 --size 96 --seed 0

step "pre-training a shared-trunk SmallAlexNet on S1 + S2 pairs (NT-Xent)"
$PYTHON meterml_pretrain.py --data_root "$OUT/data/meter-ml" --model shared --use_pairs \
  --epochs 2 --batch_size 16 --momentum 0.9 --save_path "$OUT/runs/pretrain" > "$OUT/runs/logs/pretrain.log" 2>&1

meterml() {
  local seed=$1 scenario
  local common=("$OUT/runs/pretrain/encoder.pth" --data_root "$OUT/data/meter-ml" --model shared --epochs 3
                --batch_size 16 --lr 0.02 --head_lr 1.0 --momentum 0.9 --eval_every 0 --seed "$seed")
  for scenario in s1 s2 s1s2_fused; do
    $PYTHON meterml_finetune.py "${common[@]}" --scenario "$scenario" --save_path "$OUT/runs/meterml/$scenario-ce-seed$seed"
    $PYTHON meterml_finetune.py "${common[@]}" --scenario "$scenario" --use_augs --use_sup_con \
      --save_path "$OUT/runs/meterml/$scenario-supcon-ce-seed$seed"
  done
}
step "fine-tuning on METER-ML: s1, s2, s1s2_fused x CE, SupCon+CE, seeds $SEEDS"
per_seed meterml

# The first stage of the DFC2020 pipeline: the released ResNet-50 cannot be downloaded here.
step "pre-training a dual ResNet-18 on synthetic SEN12MS S1 / S2 pairs (cross-modal NT-Xent)"
$PYTHON synthetic_data.py sen12ms "$OUT/data/sen12ms" --n 32 --size 64 --seed 0
$PYTHON sen12ms_pretrain.py --data_root "$OUT/data/sen12ms" --arch resnet18 --crop 48 --epochs 20 --batch_size 32 \
  --lr 3e-4 --schedule constant --save_path "$OUT/runs/sen12ms-pretrain" > "$OUT/runs/logs/sen12ms-pretrain.log" 2>&1

# From random initialisation and from the SEN12MS checkpoint, side by side.
dfc() {
  local common=(--data_root "$OUT/data/dfc2020" --arch resnet18 --finetune --crop 64 --eval_crop 64 --epochs 6 --batch_size 8
                --lr 3e-4 --head_lr 3e-4 --eval_every 0 --seed "$1")
  local pretrained=(--model_path "$OUT/runs/sen12ms-pretrain/checkpoint.pth")
  $PYTHON dfc_finetune.py "${common[@]}" --save_path "$OUT/runs/dfc2020/ce-seed$1"
  $PYTHON dfc_finetune.py "${common[@]}" --use_sup_con --save_path "$OUT/runs/dfc2020/supcon-ce-seed$1"
  $PYTHON dfc_finetune.py "${common[@]}" "${pretrained[@]}" --name "pre-trained CE" --save_path "$OUT/runs/dfc2020/pretrained-ce-seed$1"
  $PYTHON dfc_finetune.py "${common[@]}" "${pretrained[@]}" --use_sup_con --name "pre-trained SupCon+CE" \
    --save_path "$OUT/runs/dfc2020/pretrained-supcon-ce-seed$1"
}
step "fine-tuning a dual ResNet-18 on DFC2020 from random and SEN12MS-pre-trained weights: CE, SupCon+CE, seeds $SEEDS"
per_seed dfc

first=${SEEDS%% *}
step "t-SNE and kNN of the seed-$first s1s2_fused and DFC2020 runs (embed.py, before the checkpoints go)"
for run in meterml/s1s2_fused-ce meterml/s1s2_fused-supcon-ce dfc2020/ce dfc2020/supcon-ce; do
  log="$OUT/runs/logs/embed-${run/\//-}.log"
  $PYTHON embed.py "$OUT/runs/$run-seed$first" > "$log" 2>&1 || { tail -n 30 "$log" >&2; echo "demo: embed.py $run failed; log in $log" >&2; exit 1; }
done

# The demo's checkpoints (several GB of SmallAlexNet weights) are of no further use.
find "$OUT/runs" \( -name "*.pt" -o -name "*.pth" \) -delete
step "done; logs and run folders in $OUT/runs"
echo
echo "Results on SYNTHETIC data ($(( $(date +%s) - start )) s on this machine):"
echo
$PYTHON summarize.py "$OUT/runs/meterml" "$OUT/runs/dfc2020" --report "$OUT/report"
echo
echo "Report with figures: $OUT/report/report.md"
