#!/usr/bin/env bash
# The GPU figures issues 13 and 14 ask for, in one device call (its command may run 10 min).
# On the lent machine, after the line ../shared/tools/device-wheels prints (carry .whl):
#   <that line> bash bench/gpu_checks.sh
# Steps run in order of importance, each under its own limit, and stop when the budget
# (GPU_CHECKS_BUDGET_S, default 540 s) would be overrun; every log lands in $OUT.
set -uo pipefail
out=${OUT:-/tmp/gpu-checks}
budget=${GPU_CHECKS_BUDGET_S:-540}
py=${PYTHON:-python3}  # the device's own Python; here: PYTHON=.venv/bin/python
model=${GPU_CHECKS_MODEL---full-size}  # empty: the tiny model (a rehearsal on CPU)
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
start=$SECONDS

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  if ((left < limit / 2)); then
    echo "== $name: skipped, ${left} s of the budget left" | tee -a "$out/summary.txt"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s)"
  local began=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - began)) s" | tee -a "$out/summary.txt"
  grep -v '^{' "$out/$name.log" | grep -vi 'loading\|it/s\]' | tail -n 25
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)' \
  | tee -a "$out/gpu.txt"
step gpu_tests 180 "$py" -m pytest tests/gpu -q -p no:cacheprovider -rs
step cold_start 150 "$py" bench/cold_start.py $model
step throughput 300 "$py" bench/throughput.py $model --depths 1,8,32 --repeats 1 --no-ceiling-beside
step compile 300 "$py" bench/cold_start.py $model --compile
cat "$out/summary.txt"
