#!/usr/bin/env bash
# The one command the lead runs on the lent GPU: the GPU tests, then each GPU
# benchmark in turn, results (JSON) into $OUT. Must finish well under 10 minutes.
#   OUT=/some/dir bash scripts/gpu_check.sh
# To add a benchmark: append one line to BENCHMARKS below: a script and its arguments
# ("benchmarks/decode.py --steps 64"). Each runs as a module (python3 -m
# benchmarks.decode): `python3 benchmarks/x.py` would put benchmarks/ first on
# sys.path, so benchmarks/ never shadows a standard-library module.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=.
export OUT="${OUT:-$PWD/benchmarks/results}"
PY="${PYTHON:-python3}"  # the GPU machine's python3 (no .venv there)
mkdir -p "$OUT"

BENCHMARKS=(
  "benchmarks/vmm_driver_costs.py"
  "benchmarks/vmm.py"
  "benchmarks/yield.py"
)

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log, remember failures
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$(echo "$name" | tr '/ ' '__').log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
step "pytest tests/gpu" 240 "$PY" -m pytest -q -p no:cacheprovider tests/gpu
for bench in "${BENCHMARKS[@]}"; do
  read -r script args <<<"$bench"
  module=${script%.py}
  # shellcheck disable=SC2086  # a line may carry arguments
  step "$bench" 180 "$PY" -m "${module//\//.}" $args
done
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
