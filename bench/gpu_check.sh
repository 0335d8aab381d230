#!/usr/bin/env bash
# One command for whoever has a GPU: do the three scripts run on it, and how fast is the training
# step? At most 6 minutes on one H100, everything included.
#   1. the device (nvidia-smi -L, torch's device name);
#   2. synthetic data at the published sizes in a temporary folder (removed at exit): 64 + 32
#      DFC2020 patches of 256 px, 400 METER-ML image sets of 72 px;
#   3. each script for two short epochs, one line each with its wall time and PASS / FAIL (a FAIL
#      shows the end of the script's log): dfc_finetune.py (dual ResNet-50, --finetune
#      --use_sup_con, 224 px crops, batch 32, evaluation after each epoch), meterml_finetune.py
#      (random init, --scenario s1s2_fused --use_augs --use_sup_con), meterml_pretrain.py --use_pairs,
#      sen12ms_pretrain.py (ResNet-50, 128 px crops, batch 200); the DataLoader over the packed
#      DFC2020 copy (pack.py) with 16 workers;
#   4. bench/bench_predict.py: predict.py's scene path against the evaluation loop, windows/s
#      (resnet50, 224 px windows, batch 128, 16 workers);
#   5. bench/bench_train.py at 224 px, batch 128: original (float32 NCHW) vs default (float32) vs bf16 vs fast, model alone and with
#      a 16-worker DataLoader, evaluation, torch.compile on and off; every figure is printed as it
#      is measured.
# Each stage runs under its own `timeout`; the benchmark gets what is left of the 6 minutes, so a
# stage that hangs costs at most its own share, and a benchmark stopped by the limit keeps the
# figures it printed. Exit status: 0 when every stage passed.
#   bash bench/gpu_check.sh            # GPU, published sizes
#   bash bench/gpu_check.sh --tiny     # CPU, toy sizes (resnet18, 32 px crops, shared SmallAlexNet, 1 epoch,
#                                      # a few samples): about a minute on 2 cores
# Environment: PYTHON (default .venv/bin/python when it exists, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
case "${1:-}" in
  "") TINY=0 ;;
  --tiny) TINY=1 ;;
  *) echo "usage: bash bench/gpu_check.sh [--tiny]" >&2; exit 2 ;;
esac

if [ "$TINY" = 1 ]; then
  # Seconds for everything, the benchmark getting what the stages before it left; generous caps: on CPU the stages
  # are functional checks, and a busy machine (a test suite in parallel) can be several times slower.
  BUDGET=600
  DFC_DATA=(--n 8 --n_test 4 --size 40)
  METER_DATA=(--n 10 --val_fraction 0.4)  # 6 training image sets (2 steps), 4 validation
  COMMON=(--device cpu --workers 0 --epochs 1 --eval_every 1 --batch_size 4)
  DFC=(--arch resnet18 --crop 32 --eval_crop 32)
  METER=(--model shared)  # half the parameters of the dual SmallAlexNet (140 M): shorter steps and checkpoints
  PRETRAIN=(--device cpu --workers 0 --epochs 1 --batch_size 4 --model shared)
  SEN12MS_DATA=(--n 1 --size 40)  # 4 triplets: one step
  SEN12MS=(--device cpu --workers 0 --epochs 1 --batch_size 4 --arch resnet18 --crop 32)
  BENCH=(--tiny --device cpu --steps 1)
  PACKED=(--tiny --device cpu --steps 1)
  PREDICT=(--tiny --device cpu)
  CAP_PREDICT=120
  CAP_DATA=90; CAP_DFC=150; CAP_METER=150; CAP_PRETRAIN=150; CAP_SEN12MS=150; CAP_PACKED=150
else
  BUDGET=350
  DFC_DATA=(--n 64 --n_test 32 --size 256)
  METER_DATA=(--n 400 --val_fraction 0.2)
  COMMON=(--epochs 2 --eval_every 1 --batch_size 32)
  DFC=(--arch resnet50 --crop 224 --eval_crop 224)
  METER=(--model dual)
  PRETRAIN=(--epochs 2 --batch_size 64)
  SEN12MS_DATA=(--n 50 --size 256)  # 200 triplets: one step of batch 200 an epoch
  SEN12MS=(--epochs 2 --batch_size 200 --arch resnet50 --crop 128 --workers 16)
  BENCH=(--crop 224 --batch_size 128 --workers 16)
  PACKED=(--crop 224 --batch_size 128 --workers 16)
  PREDICT=(--window 224 --batch_size 128 --workers 16)
  CAP_PREDICT=60
  CAP_DATA=40; CAP_DFC=90; CAP_METER=60; CAP_PRETRAIN=50; CAP_SEN12MS=60; CAP_PACKED=40  # caps, not reservations
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/logs"
start=$(date +%s)
failed=0

# stage NAME CAP WHAT COMMAND...: COMMAND under `timeout CAP` (never past the budget), its output
# in a log; one line NAME WHAT: PASS / FAIL with the wall time, and the log's end on failure.
stage() {
  local name=$1 cap=$2 what=$3 left rc=0 began
  shift 3
  left=$(( BUDGET - ($(date +%s) - start) ))
  (( cap < left )) || cap=$left
  if (( cap <= 0 )); then
    echo "gpu_check: $name $what: FAIL (skipped, the ${BUDGET} s budget is spent)"
    failed=1
    return
  fi
  began=$(date +%s)
  timeout -k 5 "$cap" "$@" > "$TMP/logs/$name.log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then
    echo "gpu_check: $name $what: PASS in $(( $(date +%s) - began )) s"
  else
    [ "$rc" = 124 ] && rc="124, timed out after $cap s"
    echo "gpu_check: $name $what: FAIL (exit $rc) in $(( $(date +%s) - began )) s; the log ends:"
    tail -n 15 "$TMP/logs/$name.log" | sed "s/^/gpu_check: $name log: /"
    failed=1
  fi
}

# last_epoch NAME: the script's last epoch line (loss, samples/s, metrics), as a line of its own.
last_epoch() {
  grep "rundir INFO epoch" "$TMP/logs/$1.log" | tail -n 1 | sed "s/^.*rundir INFO /gpu_check: $1 last epoch: /" || true
}

echo "gpu_check: $(date -Is) on $(hostname), $([ "$TINY" = 1 ] && echo "--tiny (CPU, toy sizes)" || echo "published sizes"), budget $BUDGET s"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi -L | sed "s/^/gpu_check: nvidia-smi: /" || true
fi
timeout 30 "$PYTHON" -c "import torch; c = torch.cuda.is_available(); print('gpu_check: torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0) if c else 'no CUDA device', '|', torch.get_num_threads(), 'CPU threads')" \
  || echo "gpu_check: torch could not be imported"

stage synthetic_data "$CAP_DATA" "DFC2020 ${DFC_DATA[*]}, METER-ML ${METER_DATA[*]}" bash -c \
  "'$PYTHON' synthetic_data.py dfc2020 '$TMP/dfc2020' ${DFC_DATA[*]} --seed 0 && '$PYTHON' synthetic_data.py meterml '$TMP/meter-ml' ${METER_DATA[*]} --seed 0"

stage dfc_finetune.py "$CAP_DFC" "${DFC[*]} ${COMMON[*]} --finetune --use_sup_con" \
  "$PYTHON" dfc_finetune.py --data_root "$TMP/dfc2020" "${DFC[@]}" "${COMMON[@]}" --finetune --use_sup_con \
  --save_path "$TMP/runs/dfc"
last_epoch dfc_finetune.py

stage meterml_finetune.py "$CAP_METER" "random ${METER[*]} --scenario s1s2_fused --use_augs --use_sup_con ${COMMON[*]}" \
  "$PYTHON" meterml_finetune.py random --data_root "$TMP/meter-ml" "${METER[@]}" --scenario s1s2_fused --use_augs \
  --use_sup_con "${COMMON[@]}" --save_path "$TMP/runs/meterml"
last_epoch meterml_finetune.py

stage meterml_pretrain.py "$CAP_PRETRAIN" "--use_pairs ${PRETRAIN[*]}" \
  "$PYTHON" meterml_pretrain.py --data_root "$TMP/meter-ml" --use_pairs "${PRETRAIN[@]}" --save_path "$TMP/runs/pretrain"
last_epoch meterml_pretrain.py

stage sen12ms_pretrain.py "$CAP_SEN12MS" "${SEN12MS[*]}" bash -c \
  "'$PYTHON' synthetic_data.py sen12ms '$TMP/sen12ms' ${SEN12MS_DATA[*]} --seed 0 && '$PYTHON' sen12ms_pretrain.py --data_root '$TMP/sen12ms' ${SEN12MS[*]} --save_path '$TMP/runs/sen12ms'"
last_epoch sen12ms_pretrain.py

# The packed DFC2020 copy feeding the default step through the DataLoader (figures printed live).
stage packed_loader "$CAP_PACKED" "pack.py dfc2020, then bench_train.py --parts loader --configs default ${PACKED[*]}" bash -c \
  "'$PYTHON' pack.py dfc2020 '$TMP/dfc2020' '$TMP/dfc2020-packed' && '$PYTHON' bench/bench_train.py --data_root '$TMP/dfc2020-packed' --parts loader --configs default ${PACKED[*]}"
grep -E "^loader " "$TMP/logs/packed_loader.log" | sed "s/^/gpu_check: packed data: /" || true

# predict.py's scene path against the run's evaluation loop, same model and window size.
stage bench_predict.py "$CAP_PREDICT" "${PREDICT[*]}" "$PYTHON" bench/bench_predict.py "${PREDICT[@]}"
grep -E "^predict windows/s" "$TMP/logs/bench_predict.py.log" | sed "s/^/gpu_check: /" || true

# The benchmark prints its figures as it takes them: shown live, kept when it is stopped.
left=$(( BUDGET - ($(date +%s) - start) ))
echo "gpu_check: bench_train.py ${BENCH[*]}: $left s left for it"
began=$(date +%s)
rc=0
timeout -k 5 "$(( left > 1 ? left : 1 ))" "$PYTHON" bench/bench_train.py --data_root "$TMP/dfc2020" "${BENCH[@]}" || rc=$?
if [ "$rc" = 0 ]; then
  echo "gpu_check: bench_train.py ${BENCH[*]}: PASS in $(( $(date +%s) - began )) s"
else
  echo "gpu_check: bench_train.py ${BENCH[*]}: FAIL (exit $rc) in $(( $(date +%s) - began )) s; the figures above are those it took"
  failed=1
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s: $([ "$failed" = 0 ] && echo "all PASS" || echo "some stage FAILED")"
exit "$failed"
