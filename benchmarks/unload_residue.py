"""What stays on the GPU after a model's unload, by part of the engine (issue 15).

After the first unload of a synthetic SmolLM2-135M the process held 134 MiB more
than before its load, with the caching allocator and the page pool both empty
(tests/gpu/test_unload_gpu.py, H100): code of kernels loaded into the CUDA
context on first use, as far as the figures tell. This attributes it: each
variant runs in a fresh process (a context starts empty only once) with one part
of the engine switched off, and reports NVML's figure for the process at each
point: the bare context, with the CUDA libraries set up (as the daemon does),
loaded, and after each of two load/unload cycles.

    full         the daemon's defaults: torch.compile, CUDA graphs, Triton attention
    no_graphs    decode without CUDA graphs
    no_compile   torch.compile off (TORCHDYNAMO_DISABLE=1)
    eager        both off
    sdpa_warm    the defaults, with attention's prefill kernels (flash and
                 memory-efficient, masked and not) run once before the load

    python3 -m benchmarks.unload_residue [--variants full,eager]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

from benchmarks.results_io import print_table, write_result

MiB = 1 << 20
VARIANTS = {"full": {}, "no_graphs": {"graphs": False}, "no_compile": {"env": {"TORCHDYNAMO_DISABLE": "1"}},
            "eager": {"graphs": False, "env": {"TORCHDYNAMO_DISABLE": "1"}}, "sdpa_warm": {"sdpa_warm": True}}


class ProcessNotListed(RuntimeError):
    """NVML lists no figure for this process (a PID namespace hides it)."""


def nvml_used_by_me() -> int:
    import pynvml
    import torch

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == os.getpid():
            return int(proc.usedGpuMemory or 0)
    raise ProcessNotListed("NVML does not list this process (PID namespace)")


def warm_attention() -> None:
    """The prefill attention kernels a model runs: flash (no mask) and memory-efficient (a mask)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for head_dim in (64, 128):
        q = torch.randn(1, 4, 64, head_dim, dtype=torch.bfloat16, device="cuda")
        mask = torch.ones(64, 64, dtype=torch.bool, device="cuda").tril()
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
                if backend is SDPBackend.EFFICIENT_ATTENTION:
                    torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(graphs: bool, sdpa_warm: bool, cycles: int = 2) -> dict:
    """In this process: the figures of one variant (MiB); tests/gpu/test_unload_gpu.py
    asserts on them at the defaults."""
    import torch

    from engines.base import ModelInfo
    from engines.config import EngineConfig
    from engines.factory import prepare_device
    from engines.torch.engine import TorchEngine
    from engines.types import GenerateRequest, RequestKind, SamplingParams
    from kvcached.config import KvcachedConfig
    from kvcached.standalone import standalone_pool

    pool = standalone_pool(KvcachedConfig(backend="cuda"))
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    figures = {"context": nvml_used_by_me()}
    prepare_device(pool)
    if sdpa_warm:
        warm_attention()
    figures["before_load"] = nvml_used_by_me()
    for cycle in range(cycles):
        engine = TorchEngine(ModelInfo(name="smollm2", path="", source="synthetic",
                                       metadata={"config": "smollm2-135m"}),
                             EngineConfig(torch_num_slots=8, torch_max_context=2048, torch_cuda_graphs=graphs), pool)
        engine.load()
        request = GenerateRequest(kind=RequestKind.COMPLETION, prompt="the tide " * 20,
                                  sampling=SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        list(engine.generate(request))
        figures[f"loaded_{cycle}"] = nvml_used_by_me()
        engine.unload()
        del engine
        gc.collect()
        pool.shrink()
        figures[f"after_unload_{cycle}"] = nvml_used_by_me()
    figures["pool_held_after"] = pool.held()
    figures["allocator_reserved_after"] = torch.cuda.memory_reserved()
    pool.close()
    return {k: v / MiB for k, v in figures.items()}


def run_variant(name: str, timeout_s: float) -> dict:
    spec = VARIANTS[name]
    env = {**os.environ, **spec.get("env", {})}
    code = (f"import json, benchmarks.unload_residue as u; "
            f"print('RESULT', json.dumps(u.measure({spec.get('graphs', True)}, {spec.get('sdpa_warm', False)})))")
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout_s:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            figures = json.loads(line[len("RESULT "):])
            figures["residue_over_before_load"] = figures["after_unload_1"] - figures["before_load"]
            return figures
    return {"error": (done.stderr or done.stdout)[-800:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeout-s", type=float, default=150.0, help="per variant")
    args = parser.parse_args()
    results = {name: run_variant(name, args.timeout_s) for name in args.variants.split(",")}
    keys = ("context", "before_load", "loaded_0", "after_unload_0", "after_unload_1", "residue_over_before_load")
    print_table(["variant", *keys], [[name, *(r.get(k, r.get("error", "")[:40] if k == "context" else "")
                                              for k in keys)] for name, r in results.items()])
    write_result("unload_residue", {"unit": "MiB (NVML, this process)", "variants": results})


if __name__ == "__main__":
    main()
