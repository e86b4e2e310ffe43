#!/usr/bin/env bash
# Builds llama-cpp-python once (about 5.5 minutes on 2 cores: it has no binary wheel)
# and keeps the wheel in $WHEEL_CACHE so later venvs and fresh clones reuse it.
# LLAMA_CUDA=1 builds with CUDA where nvcc is present.
# The build is quiet for minutes, so a line every PROGRESS_S seconds says it is working:
# time so far, the estimate, and the build's own last progress step: "[ 45%]" from make,
# "[135/193]" from ninja (what scikit-build-core uses where ninja is installed).
set -euo pipefail
VERSION=0.3.36
PROGRESS_S=${PROGRESS_S:-10}
: "${WHEEL_CACHE:?}" "${PY:?}"
mkdir -p "$WHEEL_CACHE"
if ls "$WHEEL_CACHE"/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
  exit 0
fi
if [ "${LLAMA_CUDA:-0}" = 1 ] && command -v nvcc >/dev/null; then
  export CMAKE_ARGS="-DGGML_CUDA=on"
fi
cores=$( (nproc || sysctl -n hw.ncpu || echo 2) 2>/dev/null | head -1)
estimate_s=$(( 660 / (cores > 0 ? cores : 1) + 30 ))   # measured: ~330 s on 2 cores
log=$(mktemp "${TMPDIR:-/tmp}/llama-wheel.XXXXXX.log")
echo "Building llama-cpp-python $VERSION from source: once per machine, about $(( estimate_s / 60 )) minutes on $cores cores."
echo "  (the build's full output: $log)"
start=$SECONDS
"$PY" -m pip wheel -v --no-deps -w "$WHEEL_CACHE" "llama-cpp-python==$VERSION" >"$log" 2>&1 &
build=$!
trap 'kill $build 2>/dev/null || true' INT TERM
while kill -0 $build 2>/dev/null; do
  for _ in $(seq "$PROGRESS_S"); do kill -0 $build 2>/dev/null && sleep 1; done
  kill -0 $build 2>/dev/null || break
  elapsed=$(( SECONDS - start ))
  step=$(grep -oE '\[ *[0-9]+(%|/[0-9]+)\]' "$log" 2>/dev/null | tail -1 | tr -d ' ' || true)
  left=$(( estimate_s - elapsed ))
  printf '  building llama-cpp-python: %dm%02ds so far, %s %s\n' $(( elapsed / 60 )) $(( elapsed % 60 )) \
    "$( [ $left -gt 0 ] && echo "about $(( (left + 59) / 60 )) min left;" || echo "taking longer than usual;")" \
    "$( [ -n "$step" ] && echo "compiling, step $step" || echo configuring)"
done
if ! wait $build; then
  echo "Building llama-cpp-python failed; the last lines of $log:" >&2
  tail -30 "$log" >&2
  exit 1
fi
elapsed=$(( SECONDS - start ))
echo "Built llama-cpp-python in $(( elapsed / 60 ))m$(( elapsed % 60 ))s; later installs reuse $WHEEL_CACHE."
rm -f "$log"
