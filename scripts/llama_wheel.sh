#!/usr/bin/env bash
# Builds llama-cpp-python once (about 4 minutes on 2 cores: it has no binary wheel)
# and keeps the wheel in $WHEEL_CACHE so later venvs and fresh clones reuse it.
# LLAMA_CUDA=1 builds with CUDA where nvcc is present.
set -euo pipefail
VERSION=0.3.36
: "${WHEEL_CACHE:?}" "${PY:?}"
mkdir -p "$WHEEL_CACHE"
if ls "$WHEEL_CACHE"/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
  exit 0
fi
if [ "${LLAMA_CUDA:-0}" = 1 ] && command -v nvcc >/dev/null; then
  export CMAKE_ARGS="-DGGML_CUDA=on"
fi
echo "building llama-cpp-python $VERSION from source (once, about 4 minutes)..."
"$PY" -m pip wheel -q --no-deps -w "$WHEEL_CACHE" "llama-cpp-python==$VERSION"
