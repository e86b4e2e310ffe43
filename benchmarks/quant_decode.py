"""Quantized GGUFs on the GPU: Ebbtide's torch engine against llama.cpp's CUDA build (issue 16).

In one command on the GPU machine: llama.cpp is built for sm_90 in the
background (benchmarks/llama_peer.py, from the carried .gpu/llama.cpp-src.tar.xz;
build seconds recorded) while random-weight F16 GGUFs of real shapes are
written (benchmarks/shape_gguf.py); each is then quantized by that build's
llama-quantize, and for each file:

- torch engine (weights in their blocks, KV in kvcached virtual tensors, CUDA
  graphs): decode tok/s at batch 1 and 8, prefill tok/s of 512 and 4,096 tokens
  (benchmarks/decode.py's helpers), VRAM held by the weights (NVML: the device's
  used memory across the load; the CUDA allocator's delta; model.weight_bytes())
  against the file's tensor bytes;
- the bandwidth limit: bandwidth of a device copy / (weight bytes + KV bytes a
  decode step reads at its mean context), and the fraction reached;
- llama.cpp on the same file: llama-bench -ngl 99 -fa 1 (pp512, pp4096, tg),
  llama-batched-bench for batch 1 and 8 decode.

Every step logs, and a step that fails records its error and the rest go on; a
time budget (--budget-s) skips what would not finish, saying so. Files in the
order the issue weighs them: 8B Q4_K_M, SmolLM2 Q4_K_M, then the rest.

`--part budget`: Llama-3.1-8B Q4_K_M plus 8k tokens of KV under a 12 GiB budget
(the KV pool gets 12 GiB less the weights' VRAM), decode at batch 1 with the
KV mapped on demand against a static KV tensor (the ratio, >= 0.97 expected).

    python -m benchmarks.quant_decode [--models llama-3.1-8b,smollm2-135m] [--types Q4_K_M]
    python -m benchmarks.quant_decode --part budget
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

_HERE, _ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from benchmarks.decode import bench_engine, make_store, measure_bandwidth, prefill, sync  # noqa: E402
from benchmarks.llama_peer import Build, batched_bench, llama_bench, start_build  # noqa: E402
from benchmarks.results_io import print_table, write_result  # noqa: E402
from benchmarks.shape_gguf import BLOCK_RECIPES, named_block_shape, quantize, shape_paths, write_shape  # noqa: E402
from engines.torch.model.configs import named_config  # noqa: E402
from engines.torch.serve.runner import Runner  # noqa: E402
from engines.torch.serve.scheduler import Sequence  # noqa: E402

log = logging.getLogger("benchmarks.quant_decode")
GIB = 1 << 30


class Clock:
    """The command's time budget: steps that would not finish are skipped, not killed."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def device_used_bytes() -> int | None:
    """NVML's used memory of device 0 (this process is the only one on the lent machine)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception as exc:  # no NVML: the allocator's figure still stands
        log.warning("NVML unavailable: %s", exc)
        return None


def file_tensor_bytes(path: Path) -> int:
    from engines.torch.load.gguf_loader import open_reader

    return sum(int(t.n_bytes) for t in open_reader(path).tensors)


def load_measured(path: Path) -> tuple[torch.nn.Module, dict]:
    """The model on the GPU, and what its weights hold there."""
    from engines.torch.load.gguf_loader import load_gguf

    gc.collect()
    torch.zeros(1, device="cuda")            # the CUDA context exists before NVML's first reading
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    nvml0, alloc0 = device_used_bytes(), torch.cuda.memory_allocated()
    t = time.perf_counter()
    model, _ = load_gguf(path, "cuda")
    sync(model.device)
    nvml1, alloc1 = device_used_bytes(), torch.cuda.memory_allocated()
    file_bytes = file_tensor_bytes(path)
    row = {"load_s": time.perf_counter() - t, "file_tensor_bytes": file_bytes,
           "weights_bytes": model.weight_bytes(), "vram_torch_bytes": alloc1 - alloc0,
           "vram_nvml_bytes": None if nvml0 is None else nvml1 - nvml0}
    row["vram_torch_vs_file"] = row["vram_torch_bytes"] / file_bytes
    if row["vram_nvml_bytes"] is not None:
        row["vram_nvml_vs_file"] = row["vram_nvml_bytes"] / file_bytes
    log.info("%s: weights %.2f GB (allocator), file tensors %.2f GB", path.name, row["vram_torch_bytes"] / 1e9,
             file_bytes / 1e9)
    return model, row


def prefill_rate(model, tokens: int, args: argparse.Namespace) -> float:
    """Prefill tok/s of one `tokens` prompt (after one warm-up of the same length)."""
    store = make_store("virtual", model.cfg, model.dtype, model.device, 1, tokens + 64)
    try:
        runner = Runner(model, store, use_graphs=False, compile=False)
        prompt = torch.randint(0, model.cfg.vocab_size, (tokens,)).tolist()
        prefill(runner, [Sequence(prompt=prompt, max_tokens=1, slot=0)])
        return tokens / prefill(runner, [Sequence(prompt=prompt, max_tokens=1, slot=0)])
    finally:
        store.close()


def weights_read_per_token(model) -> int:
    """Weight bytes one token's step reads: all of them, but of stacked experts only the
    top k of E each layer routes it to (an MoE's "active" weights)."""
    from engines.torch.quant.modules import QuantExperts

    total = model.weight_bytes()
    for module in model.modules():
        if isinstance(module, QuantExperts):
            unread = 1 - model.cfg.num_experts_used / module.num_experts
            total -= int(module.qweight.nbytes() * unread)
    return total


def bench_torch(path: Path, bandwidth: float, args: argparse.Namespace) -> dict:
    model, row = load_measured(path)
    try:
        # benchmarks.decode's engine run: prefill of args.prefill (4,096), decode b1 and b8, KV virtual.
        run = bench_engine(model, "virtual", args)
        row.update({k: v for k, v in run.items() if k != "prefill_tok_s"})
        row[f"prefill_{args.prefill}_tok_s"] = run["prefill_tok_s"]
        row["prefill_512_tok_s"] = prefill_rate(model, 512, args)
        cfg = model.cfg
        # A timed b1 step reads its weights once (weights_read_per_token) and the KV of
        # ~32 + 3 + steps * 1.5 tokens on average.
        mean_ctx = 32 + 3 + 1.5 * args.steps
        row["weights_read_b1_bytes"] = weights_read_per_token(model)
        step_bytes = row["weights_read_b1_bytes"] + cfg.kv_bytes_per_token(model.dtype.itemsize) * mean_ctx
        row["bandwidth_limit_b1_tok_s"] = bandwidth / step_bytes
        row["bandwidth_fraction_b1"] = row["decode_b1_tok_s"] / row["bandwidth_limit_b1_tok_s"]
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return row


def bench_llamacpp(build: Build, path: Path, args: argparse.Namespace, clock: Clock) -> dict:
    """llama-bench (prefill 512 and args.prefill, decode b1) and llama-batched-bench (decode b8)."""
    row: dict = {}
    try:
        row.update(llama_bench(build, path, (512, args.prefill), args.steps, min(240, clock.left())))
    except Exception as exc:
        log.exception("llama-bench on %s failed", path.name)
        row["llama_bench_error"] = f"{type(exc).__name__}: {exc}"
    try:
        batched = batched_bench(build, path, (1, 8), args.steps, min(180, clock.left()))
        row["decode_b8_tok_s"] = batched.get("decode_b8_tok_s")
        row["decode_b1_tok_s_batched_bench"] = batched.get("decode_b1_tok_s")
    except Exception as exc:
        log.exception("llama-batched-bench on %s failed", path.name)
        row["batched_bench_error"] = f"{type(exc).__name__}: {exc}"
    return row


def run_decode(args: argparse.Namespace, clock: Clock) -> dict:
    work = _ROOT / "build" / "quant"
    build = start_build(args.src, work)
    results: dict = {"files": {}, "settings": {k: str(v) for k, v in vars(args).items()}}
    shapes = {}
    for model in args.models.split(","):               # written while llama.cpp builds
        source, quantized = shape_paths(work / "shapes", model, args.types.split(","))
        try:
            # --blocks: random blocks of each type written straight, no F16 file to quantize (a
            # Qwen3-30B-A3B F16 file is 61 GB, more than the GPU machine's disk).
            if args.blocks:
                shapes[model] = (None, {t: named_block_shape(model, t) for t in args.types.split(",")})
            else:
                shapes[model] = (write_shape(named_config(model), source), quantized)
        except Exception as exc:
            log.exception("writing %s failed", model)
            results["files"][model] = {"error": f"{type(exc).__name__}: {exc}"}
    results["bandwidth_gb_s"] = (bandwidth := measure_bandwidth(torch.device("cuda"))) / 1e9
    ok = build.wait(clock.left() - 60)
    results["llama_cpp_build"] = {"seconds": build.seconds, "reused": build.cached, "ok": ok,
                                  **({} if ok else {"log_tail": build.log_tail()})}
    write_result(args.name, results)
    order = [(t, m) for t in args.types.split(",") for m in shapes]   # every model's first type first
    for type_name, model in order:
        source, quantized = shapes[model]
        label = f"{model} {type_name}"
        row: dict = results["files"].setdefault(label, {})
        if clock.left() < 60:
            row["skipped"] = f"time budget: {clock.left():.0f} s left of {args.budget_s:.0f}"
            log.warning("%s: %s", label, row["skipped"])
            continue
        try:
            path = quantized[type_name] if source is None else \
                quantize(source, quantized[type_name], type_name, build.binary("llama-quantize") if ok else None)
            row["file_bytes"] = path.stat().st_size
        except Exception as exc:
            log.exception("quantizing %s failed", label)
            row["error"] = f"quantize: {type(exc).__name__}: {exc}"
            continue
        measure_sides(row, label, (("torch", lambda: bench_torch(path, bandwidth, args)),
                                   ("llama_cpp", lambda: bench_llamacpp(build, path, args, clock) if ok
                                    else {"error": "llama.cpp did not build"})),
                      lambda: write_result(args.name, results))
        row["decode_b1_vs_llama_cpp"] = _ratio(row, "decode_b1_tok_s")
        row[f"prefill_{args.prefill}_vs_llama_cpp"] = _ratio(row, f"prefill_{args.prefill}_tok_s")
    return results


def measure_sides(row: dict, label: str, sides, written: Callable[[], object]) -> None:
    """row[side] = call() for each (side, call), or the error it raised (logged; the rest go
    on), the results written after each (a call cut off at its limit keeps what ran)."""
    for side, call in sides:
        try:
            row[side] = call()
        except Exception as exc:
            log.exception("%s: %s failed", label, side)
            row[side] = {"error": f"{type(exc).__name__}: {exc}"}
        log.info("%s %s: %s", label, side, row[side])
        written()


def _ratio(row: dict, key: str) -> float | None:
    ours, theirs = row.get("torch", {}).get(key), row.get("llama_cpp", {}).get(key)
    return ours / theirs if ours and theirs else None


def run_budget(args: argparse.Namespace, clock: Clock) -> dict:
    """8B Q4_K_M + 8k tokens of KV under a 12 GiB budget: virtual vs static KV decode."""
    from kvcached.config import KvcachedConfig
    from kvcached.kv_cache.layout import KVShape
    from kvcached.kv_cache.manager import KVCache
    from kvcached.vmm import open_backend
    from benchmarks.decode import PAGE, decode_steps
    from engines.torch.serve.kv_access import KvcachedStore

    work = _ROOT / "build" / "quant"
    source, quantized = shape_paths(work / "shapes", "llama-3.1-8b", ["Q4_K_M"])
    path = quantized["Q4_K_M"]
    if not path.exists():
        build = start_build(args.src, work)
        write_shape(named_config("llama-3.1-8b"), source)
        if not build.wait(clock.left() - 120):
            return {"error": "llama.cpp did not build", "log_tail": build.log_tail()}
        quantize(source, path, "Q4_K_M", build.binary("llama-quantize"))
    model, row = load_measured(path)
    cfg, ctx = model.cfg, args.budget_tokens + 256
    weights = row["vram_nvml_bytes"] or row["vram_torch_bytes"]
    row["budget_bytes"] = args.budget_gib * GIB
    kv_config = KvcachedConfig(backend="cuda", page_size=PAGE, budget_bytes=row["budget_bytes"] - weights)
    shape = KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    prompt = torch.randint(0, cfg.vocab_size, (args.budget_tokens,)).tolist()
    for kind in ("static", "virtual"):
        store = make_store("static", cfg, model.dtype, model.device, 1, ctx) if kind == "static" else \
            KvcachedStore(KVCache(open_backend(kv_config), shape, 1, ctx, kv_config))
        try:
            runner = Runner(model, store, compile=args.compile)
            seqs = [Sequence(prompt=prompt, max_tokens=10 ** 6, slot=0)]
            prefill(runner, seqs)
            decode_steps(runner, seqs, 3)                              # capture
            rates = [args.steps / decode_steps(runner, seqs, args.steps) for _ in range(3)]
            row[kind] = {"decode_b1_tok_s": max(rates), "runs": rates, "kv_held_bytes": store.held_bytes,
                         "device_used_bytes": device_used_bytes()}
        except Exception as exc:
            log.exception("budget run, %s KV, failed", kind)
            row[kind] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            store.close()
        log.info("budget %s: %s", kind, row[kind])
    if "decode_b1_tok_s" in row.get("virtual", {}) and "decode_b1_tok_s" in row.get("static", {}):
        row["virtual_vs_static"] = row["virtual"]["decode_b1_tok_s"] / row["static"]["decode_b1_tok_s"]
        row["weights_plus_kv_gib"] = (weights + row["virtual"]["kv_held_bytes"]) / GIB
    return {"llama-3.1-8b Q4_K_M, 8k KV": row, "settings": {k: str(v) for k, v in vars(args).items()}}


def print_decode(results: dict) -> None:
    rows = []
    for label, row in results["files"].items():
        ours, theirs = row.get("torch", {}), row.get("llama_cpp", {})
        rows.append([label, ours.get("decode_b1_tok_s", "-"), theirs.get("decode_b1_tok_s", "-"),
                     ours.get("decode_b8_tok_s", "-"), theirs.get("decode_b8_tok_s", "-"),
                     ours.get("prefill_512_tok_s", "-"), theirs.get("prefill_512_tok_s", "-"),
                     ours.get("prefill_4096_tok_s", "-"), theirs.get("prefill_4096_tok_s", "-"),
                     ours.get("bandwidth_fraction_b1", "-"), ours.get("vram_torch_vs_file", "-"),
                     row.get("skipped") or row.get("error") or ours.get("error") or ""])
    print_table(["file", "b1 ours", "b1 llama", "b8 ours", "b8 llama", "pp512 ours", "pp512 llama",
                 "pp4096 ours", "pp4096 llama", "bw frac", "vram/file", "note"], rows)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("decode", "budget"), default="decode")
    parser.add_argument("--models", default="llama-3.1-8b,smollm2-135m")
    parser.add_argument("--types", default="Q4_K_M,Q8_0,Q4_0")
    parser.add_argument("--src", type=Path, default=_ROOT / ".gpu" / "llama.cpp-src.tar.xz")
    parser.add_argument("--budget-s", type=float, default=560.0, help="skip what would not finish by then")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=4096 + 512)
    parser.add_argument("--blocks", action="store_true",
                        help="random blocks of each type written straight (shape_gguf.named_block_shape) instead of "
                             "an F16 file quantized by llama.cpp: for shapes whose F16 file does not fit the disk")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow to warm)")
    parser.add_argument("--budget-gib", type=float, default=12.0)
    parser.add_argument("--budget-tokens", type=int, default=8192)
    parser.add_argument("--name", default=None, help="result file name (default quant_decode / quant_budget)")
    args = parser.parse_args()
    unwritable = set(args.types.split(",")) - set(BLOCK_RECIPES)
    if args.blocks and unwritable:
        parser.error(f"--blocks writes {', '.join(BLOCK_RECIPES)} files, not {', '.join(sorted(unwritable))}")
    args.triton = True
    args.name = args.name or ("quant_decode" if args.part == "decode" else "quant_budget")
    if not torch.cuda.is_available():
        sys.exit("quant_decode: needs a CUDA device (the CPU checks are tests/engines/test_quant_greedy.py)")
    clock = Clock(args.budget_s)
    torch.manual_seed(0)
    if args.part == "decode":
        results = run_decode(args, clock)
        print_decode(results)
    else:
        results = run_budget(args, clock)
        print(results)
    print(f"results: {write_result(args.name, results)}")


if __name__ == "__main__":
    main()
