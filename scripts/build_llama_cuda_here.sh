#!/usr/bin/env bash
# llama.cpp's CUDA tools (sm_90), built on THIS machine, which has no GPU, and packed into
# .gpu/ as the prebuilt bin/ that benchmarks/llama_prebuilt.py restores on the lent GPU
# machine. Then a GPU call skips its ~330 s build (a session has ~1,800 s of device time).
# The toolkit is CUDA 13.0 from pip, matching the GPU machine's (nvcc 13.0, driver 580,
# torch 2.11+cu130). Nothing of it ships: only bin/ (the four tools, libllama and libggml*,
# libcudart), without cuBLAS, which the GPU machine has (llama_prebuilt.tool_env finds it).
# About 21 minutes on 2 cores; a second run reuses the build. Needs .gpu/llama.cpp-src.tar.xz
# (scripts/fetch_llama_src.sh).
#   bash scripts/build_llama_cuda_here.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${LLAMA_BUILD_DIR:-/tmp/llbuild}"
PY="${PY:-.venv/bin/python}"
CUDA="$WORK/cuda"
SRC_TAR=.gpu/llama.cpp-src.tar.xz
[ -f "$SRC_TAR" ] || { echo "$SRC_TAR is missing: run scripts/fetch_llama_src.sh first"; exit 2; }
mkdir -p "$WORK/src"

# 1. CUDA 13.0's compiler, runtime, cuBLAS and headers from pip, laid out as a toolkit root.
if [ ! -x "$CUDA/bin/nvcc" ]; then
  "$PY" -m pip install --quiet --target "$WORK/pipcuda" nvidia-cuda-nvcc==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.0.2.14 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  rm -rf "$CUDA" && mkdir -p "$CUDA/lib64/stubs"
  cp -r "$WORK/pipcuda/nvidia/cu13/"{bin,include,nvvm} "$CUDA/"
  cp -a "$WORK/pipcuda/nvidia/cu13/lib/." "$CUDA/lib64/"
  ln -sfn lib64 "$CUDA/lib"
  for lib in cudart cublas cublasLt; do ln -sf "lib$lib.so.13" "$CUDA/lib64/lib$lib.so"; done
fi

# 2. Sources.
if [ ! -d "$WORK/src/llama.cpp" ]; then
  tar xJf "$SRC_TAR" -C "$WORK/src"
fi

# 3. A link-time stub of the driver library: every cu* driver call ggml-cuda makes, as a
#    dummy, under the soname libcuda.so.1, so the binaries load the real driver at run time.
if [ ! -f "$CUDA/lib64/stubs/libcuda.so" ]; then
  grep -rhoE '\bcu[A-Z][A-Za-z0-9_]*\(' "$WORK/src/llama.cpp/ggml/src/ggml-cuda" | tr -d '(' | sort -u \
    | sed 's/.*/int &(void) { return 999; }/' > "$WORK/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib64/stubs/libcuda.so" "$WORK/cuda_stub.c"
  ln -sf libcuda.so "$CUDA/lib64/stubs/libcuda.so.1"
fi

# 4. The flags of benchmarks/llama_peer.CMAKE_FLAGS, plus: no native CPU features (the GPU
#    machine's CPU differs), this toolkit, libraries found next to the tools ($ORIGIN).
export PATH="$CUDA/bin:$PATH" CUDAARCHS=90
LINK="-Wl,-rpath-link,$CUDA/lib64:$CUDA/lib64/stubs"
OUT="$WORK/llama.cpp-build"
cmake -S "$WORK/src/llama.cpp" -B "$OUT" -G Ninja \
  $("$PY" -c "from benchmarks.llama_peer import CMAKE_FLAGS; print(' '.join(CMAKE_FLAGS))") \
  -DGGML_NATIVE=OFF -DCUDAToolkit_ROOT="$CUDA" -DCMAKE_CUDA_COMPILER="$CUDA/bin/nvcc" \
  -DCMAKE_EXE_LINKER_FLAGS="$LINK" -DCMAKE_SHARED_LINKER_FLAGS="$LINK" -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON
TARGETS=$("$PY" -c "from benchmarks.llama_peer import TARGETS; print(' '.join(TARGETS))")
# shellcheck disable=SC2086  # the target list
nice -n 10 cmake --build "$OUT" -j"$(nproc)" --target $TARGETS

# 5. bin/ stripped, with libcudart beside the tools, packed into .gpu/ (llama_prebuilt.pack).
strip --strip-unneeded "$OUT"/bin/*.so* "$OUT"/bin/llama-* 2>/dev/null || true
cp -a "$CUDA"/lib64/libcudart.so.13* "$OUT/bin/"
"$PY" -c "
from pathlib import Path
from benchmarks.llama_prebuilt import pack
files = pack(Path('$OUT/bin'), Path('$SRC_TAR'), Path('.gpu'))
print('\n'.join(map(str, files)) or 'not packed: too big (see the log line above)')"
