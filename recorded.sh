# Sourced by the recorded experiments (dfc_finetune.sh, meterml_finetune.sh, sen12ms_pretrain.sh):
# what they share. HERE is the repository; the scripts run from the caller's folder, so relative
# paths (DATA, OUT, WEIGHTS, paths in EXTRA) are read from there.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${PYTHON:-}" ]; then [ -x "$HERE/.venv/bin/python" ] && PYTHON="$HERE/.venv/bin/python" || PYTHON=python; fi
SEEDS=${SEEDS:-0 1 2 3 4}
device=()
[ -n "${DEVICE:-}" ] && device=(--device "$DEVICE")

# runs SCRIPT NAME FLAGS...: SCRIPT once per seed of SEEDS into $OUT/NAME-seed<seed>, with the
# script's `recorded` flags, then FLAGS, the seed, DEVICE, the `fast` flags and EXTRA.
runs() {
  local script=$1 name=$2 seed
  shift 2
  for seed in $SEEDS; do
    $PYTHON "$HERE/$script" "${recorded[@]}" "$@" --seed "$seed" "${device[@]}" "${fast[@]}" \
      --save_path "$OUT/$name-seed$seed" ${EXTRA:-}
  done
}
