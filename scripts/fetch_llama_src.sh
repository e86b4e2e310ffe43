#!/usr/bin/env bash
# Makes .gpu/llama.cpp-src.tar.xz: the llama.cpp sources vendored in the
# llama-cpp-python 0.3.36 sdist (the very llama.cpp our CPU engine runs), for the
# GPU machine, which has nvcc and CMake but no network. The lead carries .gpu/
# (git-ignored); benchmarks/quant_decode.py builds llama-bench and llama-quantize
# from it there. Run once, here, where pip reaches the registry:
#   bash scripts/fetch_llama_src.sh        # PY=... picks the python (default .venv/bin/python)
# Left out (not needed to build those two targets, ~46 MB left): docs, models,
# media, benches, examples, tests, the server's web UI, git metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
PY="${PY:-.venv/bin/python}"
DEST=.gpu/llama.cpp-src.tar.xz
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch_llama_src: downloading the llama-cpp-python $VERSION sdist"
"$PY" -m pip download -q --no-deps --no-binary :all: \
  "llama-cpp-python==$VERSION" -d "$tmp" 2>&1 | grep -v "^WARNING: Location" || true
sdist=$(ls "$tmp"/llama_cpp_python-"$VERSION".tar.gz)
tar xzf "$sdist" -C "$tmp"
src="$tmp/llama_cpp_python-$VERSION/vendor"
[ -f "$src/llama.cpp/CMakeLists.txt" ] || { echo "fetch_llama_src: no vendor/llama.cpp in $sdist" >&2; exit 1; }
mkdir -p .gpu
tar cJf "$DEST" -C "$src" \
  --exclude='llama.cpp/docs' --exclude='llama.cpp/models' --exclude='llama.cpp/media' \
  --exclude='llama.cpp/benches' --exclude='llama.cpp/examples' --exclude='llama.cpp/tests' \
  --exclude='llama.cpp/tools/ui' --exclude='llama.cpp/tools/server/public*' --exclude='.git*' \
  llama.cpp
echo "fetch_llama_src: $DEST ($(du -h "$DEST" | cut -f1)); carry .gpu to the GPU machine"
