#!/usr/bin/env bash
# The one command run on the lent GPU: the GPU tests, then the GPU benchmarks,
# each with a time limit; results (JSON and logs) packed into $OUT/gpu_results.tgz
# (the device tool brings back at most 8 files). Each part fits one call of under
# 10 minutes:
#   bash scripts/gpu_check.sh                  # everything
#   bash scripts/gpu_check.sh tests vmm yield  # only these parts
#   bash scripts/gpu_check.sh quant            # issue 16: carry .gpu (llama.cpp sources) and .whl (gguf)
# Benchmarks run as modules (python3 -m benchmarks.decode), with the repository root
# on sys.path. The end-to-end parts (pressure, colocate, exhaustion) take most of a call each.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
FINAL_OUT="${OUT:-$PWD/benchmarks/results}"
# On the lent machine: a fresh llama.cpp build's bin/ comes back beside the results, not
# inside the tarball (benchmarks/llama_prebuilt.py: the next machine skips the build).
[ -n "${OUT:-}" ] && export DEVICE_OUT="$OUT"
export OUT=/tmp/gpu_results   # benchmarks write here; packed at the end
mkdir -p "$OUT" "$FINAL_OUT"
PY="${PYTHON:-python3}"  # the GPU machine's python3 (no .venv there)
# Packages that machine lacks travel as wheels in .whl/ (carry it): fastapi, gguf...
if [ -d .whl ]; then
  bash benchmarks/gpu_setup.sh && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

# part -> "seconds command..."
declare -A PARTS=(
  [tests]="330 -m pytest -q -p no:cacheprovider --timeout 240 tests/gpu"  # no -x: every file reports
  # The GPU tests written or touched since the last lease (no -x: each file reports on its own).
  [tests_new]="300 -m pytest -q -p no:cacheprovider --timeout 240 tests/gpu/test_quant_gated_gpu.py tests/gpu/test_fused_small_gpu.py tests/gpu/test_torch_warmup_gpu.py tests/gpu/test_quant_model_gpu.py tests/gpu/test_torch_engine_gpu.py"
  # The MoE layer's eager kernels (routing, combine, gated experts) and the q/k norm pair (issue 17).
  [moe_tests]="150 -m pytest -q -p no:cacheprovider --timeout 120 tests/gpu/test_quant_experts_gpu.py tests/gpu/test_fused_small_gpu.py"
  # The fused eager kernels and batch 1's graphs only (a short call).
  [tests_quick]="130 -m pytest -q -p no:cacheprovider --timeout 120 tests/gpu/test_fused_small_gpu.py tests/gpu/test_torch_warmup_gpu.py"
  [vmm]="120 -m benchmarks.vmm_driver_costs"
  [vmm2]="150 -m benchmarks.vmm"
  [yield]="240 -m benchmarks.yield"
  # Issue 17: sliding-window layers' old pages given back (Gemma 3/2, Mistral KV shapes, no weights).
  [window_kv]="120 -m benchmarks.window_kv"
  [decode]="420 -m benchmarks.decode"
  [decode_check]="330 -m benchmarks.decode --models smollm2-135m,llama-3.1-8b --kv static,virtual"
  [families]="240 -m pytest -q -p no:cacheprovider --timeout 200 tests/gpu/test_families_gpu.py"
  [decode_families]="580 -m benchmarks.decode --models qwen3-8b,phi-4-mini,gemma-3-12b,qwen3-30b-a3b --kv static,virtual --steps 64"
  [profile]="300 -m benchmarks.decode_profile"
  # The served step of Q4_K_M files (random blocks), kernel by kernel: what a layer launches (issue 16).
  [profile_q4km]="300 -m benchmarks.decode_profile --q4km --variants triton"
  # Qwen3-30B-A3B's served step (Q4_K_M random blocks, eager graph as batch 1 keeps it), kernel by kernel (issue 17).
  # SmolLM2's served batch-1 step when it stays eager (batch_one's choice on the H100), kernel by kernel (issue 16).
  [profile_small]="200 -m benchmarks.decode_profile --q4km --models smollm2-135m --variants triton --no-compile --steps 30"
  # Programmatic dependent launch (engines/torch/kernels/pdl.py): bit-equal decode and a kernel
  # chain with and without it; SmolLM2's eager batch-1 step both ways, kernel by kernel.
  # The decode step's inputs read from pinned memory by its first kernel, PDL, quantized models' graphs.
  [tests_inputs]="300 -m pytest -q -p no:cacheprovider --timeout 120 tests/gpu/test_step_inputs_gpu.py tests/gpu/test_pdl_gpu.py tests/gpu/test_normed_input_gpu.py tests/gpu/test_quant_group_gpu.py tests/gpu/test_fused_small_gpu.py tests/gpu/test_quant_model_gpu.py"
  [pdl]="150 -m pytest -q -p no:cacheprovider --timeout 120 tests/gpu/test_pdl_gpu.py"
  [profile_pdl]="240 -m benchmarks.decode_profile --q4km --models smollm2-135m --variants triton-separate-norms,triton-ungrouped,triton,triton-copied-inputs --no-compile --steps 30"
  [profile_pdl_8b]="300 -m benchmarks.decode_profile --q4km --models llama-3.1-8b --variants triton-no-pdl,triton --no-compile --steps 20"
  [quant_small_check]="120 -m benchmarks.quant_small --no-sweep --shapes smollm2 --name quant_small_check"
  [profile_moe]="300 -m benchmarks.decode_profile --q4km --models qwen3-30b-a3b --variants triton --no-compile --steps 30"
  [host]="300 -m benchmarks.decode_host --models smollm2-135m,llama-3.2-1b,llama-3.1-8b"
  [engines]="180 -m benchmarks.engine_compare --model synthetic/smollm2-135m --engines torch"
  [pressure]="560 -m benchmarks.desktop_pressure"
  # Issue 19: a 12 GiB card, two models, a video call that wants 6 GiB.
  [pressure_12gib]="560 -m benchmarks.desktop_pressure --budget 12GiB --model-config qwen2.5-coder-1.5b --second-model llama-3.2-1b --leave-free 512MiB --name desktop_pressure_12gib"
  [colocate]="590 -m benchmarks.colocate"
  [constrained]="200 -m benchmarks.constrained --model synthetic/smollm2-135m --rounds 3"
  # The bundled SmolLM2 file (98 MB) is over what a call carries (64 MiB, the lent machine has no
  # pip): its shape as random Q4_K_M blocks, written there (cold_start --shape).
  [cold_start]="420 -m benchmarks.cold_start --shape smollm2-135m --name smollm2-135m"
  # Issue 22's 8B case against llama.cpp's load of the same file (carry .gpu: a prebuilt bin/ or the sources).
  [cold_start_8b]="590 -m benchmarks.cold_start --shape llama-3.1-8b --llama-src .gpu/llama.cpp-src.tar.xz --name 8b --runs 2"
  # Issue 15: captures while another thread allocates; the default generator after a failed capture.
  [capture]="150 -m pytest -q -s -p no:cacheprovider --timeout 140 tests/gpu/test_graph_capture_gpu.py"
  [unload]="300 -m pytest -q -s -p no:cacheprovider --timeout 280 tests/gpu/test_unload_gpu.py"
  # What stays after an unload, by part of the engine (a fresh process per variant).
  [unload_residue]="560 -m benchmarks.unload_residue"
  # The same in the daemon at its defaults, step by step (one model, again, two, under pressure).
  [daemon_residue]="300 -m benchmarks.daemon_residue"
  # What each cuBLAS handle holds (one per thread serving at once) and CUBLAS_WORKSPACE_CONFIG's cost.
  [cublas_handles]="240 -m benchmarks.cublas_handles"
  [daemon_residue_2k]="300 -m benchmarks.daemon_residue --max-context 2048"   # unload_residue's context
  [weights_tier]="580 -m benchmarks.weights_tier"   # carry .gpu too: llama.cpp's load of the same files
  # EXHAUSTION_BUDGET_S: less where other parts share the call (each call has 600 s).
  [exhaustion]="590 -m benchmarks.exhaustion --backend cuda --cycles 10 --hold-s 20 --budget-s ${EXHAUSTION_BUDGET_S:-540}"
  [quant_matvec]="240 -m benchmarks.quant_matvec"
  # A small model's matvecs (SmolLM2) and the MoE's k/v/o: today's path against a launch sweep (issues 16, 17).
  [quant_small]="480 -m benchmarks.quant_small"
  # Q4_K at batch 1 on dp4a (int8 activations, as llama.cpp's mmvq) against the float matvec.
  [quant_dp4a]="240 -m benchmarks.quant_dp4a"
  # Only the per-shape launch sweep (what the launches and row thresholds should say per 8B
  # layer shape), at decode's batches 1, 2 and 8 (~60 s each on the H100).
  [quant_dp4a_sweep]="240 -m benchmarks.quant_dp4a --sweep-only --sweep-rows 1,2,8 --name quant_dp4a_sweep"
  # Quantized GGUFs vs llama.cpp's CUDA build (carry .gpu: scripts/fetch_llama_src.sh makes it).
  # One call each; the build and the shape files stay under build/quant for the next part.
  [quant]="590 -m benchmarks.quant_decode --budget-s 540"
  # As the daemon serves (its decode step compiled), against llama.cpp in the same run.
  [quant_as_served]="590 -m benchmarks.quant_decode --compile --name quant_decode_compiled --budget-s 540"
  # The same on random blocks written straight (a fresh machine skips the 8B F16 file and its quantize).
  [quant_as_served_blocks]="590 -m benchmarks.quant_decode --blocks --compile --name quant_decode_compiled --budget-s ${QUANT_BUDGET_S:-540}"
  # Issue 16's figures only (8B and SmolLM2 Q4_K_M, compiled as served): a short call.
  [quant_served_q4km]="450 -m benchmarks.quant_decode --blocks --compile --types Q4_K_M --name quant_decode_compiled_q4km --budget-s ${QUANT_BUDGET_S:-420}"
  # Issue 16's "Q8_0 and Q4_0 reported the same way": the 8B as random blocks of each (carry .gpu).
  [quant_served_legacy]="290 -m benchmarks.quant_decode --blocks --compile --types Q8_0,Q4_0 --models llama-3.1-8b --name quant_decode_compiled_legacy --budget-s ${QUANT_BUDGET_S:-270}"
  # The same for Q4_0 only, eager (no compile: batch 1 serves the eager graph on an 8B): a short call.
  [quant_legacy_eager]="150 -m benchmarks.quant_decode --blocks --types Q4_0 --models llama-3.1-8b --name quant_decode_legacy_eager --budget-s ${QUANT_BUDGET_S:-130}"
  [quant_more]="590 -m benchmarks.quant_decode --types Q8_0,Q4_0 --name quant_decode_more --budget-s 540"
  # Batch-1 decode after 512, 4k and 16k tokens of context against llama-bench -d (carry .gpu):
  # what attention's one program a KV head costs an agent's long prompts.
  [decode_depth]="590 -m benchmarks.decode_depth --models llama-3.1-8b --depths 512,4096,16384 --budget-s 540"
  [quant_budget]="590 -m benchmarks.quant_decode --part budget --budget-s 540"
  # Issue 17: Qwen3-30B-A3B's shape, experts stacked in Q4_K/Q6_K blocks (random blocks written
  # straight: its F16 file would not fit the disk), compiled as the daemon serves it, against
  # llama.cpp on the same file.
  [quant_moe]="590 -m benchmarks.quant_decode --blocks --compile --models qwen3-30b-a3b --types Q4_K_M --name quant_decode_moe --budget-s 540"
  # Issue 17's dense families at their shapes, Q4_K_M random blocks, compiled as the daemon serves them,
  # against llama.cpp on the same files (tests/benchmarks/test_family_block_shapes.py writes them small).
  [quant_families]="590 -m benchmarks.quant_decode --blocks --compile --models qwen3-8b,phi-4-mini,gemma-3-12b --types Q4_K_M --name quant_decode_families --budget-s 540"
  # The daemon's decode (compiled) against eager, on random Q4_K_M blocks: no llama.cpp build needed.
  [quant_compiled]="400 -m benchmarks.quant_compiled --budget-s 380"
)
ORDER=(tests vmm vmm2 yield decode engines)  # pressure and colocate: one call each
[ $# -gt 0 ] && ORDER=("$@")

status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
for part in "${ORDER[@]}"; do
  spec=${PARTS[$part]:-}
  [ -n "$spec" ] || { echo "unknown part: $part (known: ${!PARTS[*]})"; status=2; continue; }
  read -r limit cmd <<<"$spec"
  t0=$SECONDS
  echo "=== $part"
  # shellcheck disable=SC2086  # the command carries its arguments
  timeout "$limit" "$PY" $cmd > >(tee "$OUT/$part.log") 2>&1
  rc=$?
  echo "=== $part: rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
  # Packed after every part: a call cut off at its limit still brings back what ran.
  tar czf "$FINAL_OUT/gpu_results.tgz" -C "$OUT" .
done
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
