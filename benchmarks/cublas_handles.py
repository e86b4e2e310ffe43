"""What a cuBLAS handle holds on the device, and what CUBLAS_WORKSPACE_CONFIG costs (issue 15).

The daemon serving two models at once kept 64 MiB more after both unloaded than after one
(daemon_residue_h100_1138utc.json: "two" 66 MiB over the level before the first load, "one" 2).
torch gives each thread that runs cuBLAS a handle from a per-process pool and never
destroys one; each serving loop is a thread, so two models decoding at once make a second
handle. This measures, in a fresh process per setting (NVML, this process):
  handles   the device memory after 1, 2, 3 threads ran a bf16 linear layer at once
            (workspaces cleared, allocator emptied: what stays is their handles);
  raw       one cublasCreate / cublasDestroy through the library torch loaded;
  gemm      bf16 linear layers of decode and prefill shapes, GPU time and host time a call,
            with CUBLAS_WORKSPACE_CONFIG unset and set (it sizes the handle's own pool), and
            with torch preferring cuBLASLt (whose handles hold no workspace of their own).

    python -m benchmarks.cublas_handles      # GPU only; writes benchmarks/results/cublas_handles.json
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
# (CUBLAS_WORKSPACE_CONFIG, torch's preferred BLAS library): "" / None = unset, the defaults.
# cuBLASLt handles take no workspace of their own (the caller's): preferring it may leave a
# thread's GEMMs without the 64 MiB handle, where torch does not make one anyway.
# "latched": the daemon's way (engines/torch/cublas_pool.py): cuBLAS reads ":0:0" at one raw
# handle's creation, torch reads the variable unset; ":32768:1": both read 32 MiB.
SETTINGS = (("", None), ("latched", None), (":32768:1", None), (":4096:8", None), (":0:0", None),
            ("", "cublaslt"))
SHAPES = ((1, 4096, 4096), (1, 14336, 4096), (512, 4096, 4096), (512, 14336, 4096), (4096, 4096, 4096))
CALLS = 50


def process_mib(torch, nvml, handle) -> float:
    torch.cuda.synchronize()
    for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == os.getpid():
            return proc.usedGpuMemory / MiB
    return 0.0


def handles_at_once(torch, threads: int) -> None:
    """`threads` threads each run a bf16 linear layer (what a serving thread does, whichever
    library torch picks) and stay alive until all have."""
    barrier = threading.Barrier(threads)
    weight = torch.randn(256, 256, dtype=torch.bfloat16, device="cuda")

    def hold() -> None:
        with torch.inference_mode():
            torch.nn.functional.linear(weight[:2], weight).sum().item()
        barrier.wait()

    workers = [threading.Thread(target=hold) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    del weight
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()


def raw_create_destroy(torch, nvml, handle) -> dict:
    from engines.torch.cublas_pool import loaded_cublas_path

    path = loaded_cublas_path()
    if path is None:
        return {"library": None}
    lib = ctypes.CDLL(path)
    raw = ctypes.c_void_p()
    before = process_mib(torch, nvml, handle)
    lib.cublasCreate_v2(ctypes.byref(raw))
    created = process_mib(torch, nvml, handle)
    lib.cublasDestroy_v2(raw)
    return {"library": path, "create_mib": created - before, "destroy_mib": process_mib(torch, nvml, handle) - created}


def gemm_us(torch) -> dict:
    out = {}
    for m, n, k in SHAPES:
        a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):
            torch.nn.functional.linear(a, w)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host_started = time.perf_counter()
        start.record()
        for _ in range(CALLS):
            torch.nn.functional.linear(a, w)
        host_us = (time.perf_counter() - host_started) / CALLS * 1e6
        end.record()
        end.synchronize()
        out[f"{m}x{n}x{k}"] = {"gpu_us": start.elapsed_time(end) / CALLS * 1000, "host_us": host_us}
    return out


def measure_one_setting() -> dict:
    """In this process, with the environment it was started with."""
    import pynvml as nvml
    import torch

    if os.environ.get("EBBTIDE_PREFERRED_BLAS"):
        torch.backends.cuda.preferred_blas_library(os.environ["EBBTIDE_PREFERRED_BLAS"])
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    torch.zeros(1, device="cuda")
    own_pool_mib = None
    if os.environ.get("EBBTIDE_CUBLAS_LATCH"):
        from engines.torch.cublas_pool import handles_without_own_pool
        own_pool_mib = handles_without_own_pool(lambda: torch.cuda.mem_get_info()[0])
    context = process_mib(torch, nvml, handle)
    held = {}
    for threads in (1, 2, 3):
        handles_at_once(torch, threads)
        held[threads] = process_mib(torch, nvml, handle) - context
    return {"workspace_config": "latched" if os.environ.get("EBBTIDE_CUBLAS_LATCH") else os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "latched_handle_mib": own_pool_mib,
            "preferred_blas": str(torch.backends.cuda.preferred_blas_library()), "context_mib": context,
            "handles_mib_over_context": held, "raw": raw_create_destroy(torch, nvml, handle),
            "gemm": gemm_us(torch), "device": torch.cuda.get_device_name()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(measure_one_setting()))
        return
    from benchmarks.results_io import print_table, write_result

    rows = []
    for setting, library in SETTINGS:
        env = {k: v for k, v in os.environ.items()
               if k not in ("CUBLAS_WORKSPACE_CONFIG", "EBBTIDE_PREFERRED_BLAS", "EBBTIDE_CUBLAS_LATCH")}
        if setting == "latched":
            env["EBBTIDE_CUBLAS_LATCH"] = "1"
        elif setting:
            env["CUBLAS_WORKSPACE_CONFIG"] = setting
        if library:
            env["EBBTIDE_PREFERRED_BLAS"] = library
        done = subprocess.run([sys.executable, "-m", "benchmarks.cublas_handles", "--one"], env=env, cwd=_ROOT,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print_table(["CUBLAS_WORKSPACE_CONFIG", "BLAS", "1 / 2 / 3 threads MiB", "raw create MiB",
                 *[f"{s} gpu/host us" for s in rows[0]["gemm"]]],
                [[r["workspace_config"] or "unset", r["preferred_blas"],
                  " / ".join(f"{v:.0f}" for v in r["handles_mib_over_context"].values()),
                  f"{r['raw'].get('create_mib', float('nan')):.0f}",
                  *[f"{g['gpu_us']:.0f}/{g['host_us']:.0f}" for g in r["gemm"].values()]] for r in rows])
    write_result("cublas_handles", {"settings": rows})


if __name__ == "__main__":
    main()
