"""Quantized matrix-vector kernels on Llama-3.1-8B shapes (issue 16).

For each GGUF block type and weight shape of an 8B model, at M = 1 and 8 rows
of x: the Triton matvec's time and GB/s (quantized weight bytes / time) against
the device's measured copy bandwidth, and against dequantize + cuBLAS. Then a
per-token estimate of an 8B decode step's weight reads (Q4_K_M's mix: Q4_K,
Q6_K for attn_v/ffn_down in half the layers and for the output head), the
block-size sweep the defaults come from, and the prefill choice (dequantize +
cuBLAS against the Triton dequantize-tile matmul against bf16 cuBLAS).

Every time is a CUDA graph of ITERS calls replayed, as the engine runs decode.
Weights are random bytes (timing does not read values). JSON to
benchmarks/results/quant_matvec.json.

    python3 -m benchmarks.quant_matvec [--types Q4_K,Q6_K] [--no-sweep] [--no-prefill]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE, _ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.results_io import print_table, write_result  # noqa: E402
from engines.torch.kernels import quant_kernels  # noqa: E402
from engines.torch.kernels.quant_ops import qmatmul_dequant  # noqa: E402
from engines.torch.kernels.quant_weight import BLOCK_TYPES, QuantWeight  # noqa: E402
from engines.torch.load.dequant import TORCH_DEQUANT  # noqa: E402

# Llama-3.1-8B: name -> (out_features, in_features), per layer (32 layers) and the head
LAYER = {"attn_q": (4096, 4096), "attn_k": (1024, 4096), "attn_v": (1024, 4096), "attn_o": (4096, 4096),
         "ffn_gate": (14336, 4096), "ffn_up": (14336, 4096), "ffn_down": (4096, 14336)}
HEAD = (128256, 4096)
N_LAYERS = 32
SHAPES = sorted(set(LAYER.values()) | {HEAD})
ORDER = ["Q4_K", "Q6_K", "Q8_0", "Q4_0", "Q5_K", "Q5_0", "Q5_1", "Q4_1", "Q3_K", "Q2_K"]
ITERS = 20


def _more_bits(layer: int) -> bool:
    """llama.cpp's use_more_bits: the Q4_K_M layers whose attn_v and ffn_down are Q6_K."""
    n = N_LAYERS
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


def random_weight(type_name: str, shape: tuple[int, int]) -> QuantWeight:
    block, size, _ = TORCH_DEQUANT[type_name]
    raw = torch.randint(0, 256, (shape[0], shape[1] // block * size), dtype=torch.uint8, device="cuda")
    return QuantWeight.from_gguf(raw, type_name, shape, "cuda")


def graph_time(fn, iters: int = ITERS) -> float:
    """Seconds per call of fn, from a CUDA graph of `iters` calls (best of 3 replays)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    best = float("inf")
    for _ in range(3):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3 / iters)
    del graph
    return best


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = graph_time(lambda: dst.copy_(src))
    return 2 * src.numel() / seconds


def bench_types(types: list[str], bandwidth: float) -> dict:
    """type -> shape -> {M: {matvec_us, matvec_gbs, dequant_matmul_us}}."""
    out: dict = {}
    for type_name in types:
        out[type_name] = {}
        for shape in SHAPES:
            w = random_weight(type_name, shape)
            row = {}
            for m in (1, 4, 8):
                x = torch.randn(m, shape[1], device="cuda", dtype=torch.bfloat16)
                t_mv = graph_time(lambda: quant_kernels.qmatvec(x, w))
                t_dq = graph_time(lambda: qmatmul_dequant(x, w))
                row[m] = {"matvec_us": t_mv * 1e6, "matvec_gbs": w.nbytes() / t_mv / 1e9,
                          "of_copy_bw": w.nbytes() / t_mv / bandwidth, "dequant_matmul_us": t_dq * 1e6}
            out[type_name][f"{shape[0]}x{shape[1]}"] = {"bytes": w.nbytes(), **row}
            del w
    return out


def token_estimate(per_type: dict, bandwidth: float, mix: dict[str, str], head: str) -> dict:
    """Weight-read time of one 8B decode token at M=1 from the per-shape times; mix: layer tensor -> type
    (a callable per layer for Q4_K_M)."""
    seconds = nbytes = 0.0
    for layer in range(N_LAYERS):
        for name, shape in LAYER.items():
            type_name = mix[name](layer) if callable(mix[name]) else mix[name]
            cell = per_type[type_name][f"{shape[0]}x{shape[1]}"]
            seconds += cell[1]["matvec_us"] / 1e6
            nbytes += cell["bytes"]
    cell = per_type[head][f"{HEAD[0]}x{HEAD[1]}"]
    seconds += cell[1]["matvec_us"] / 1e6
    nbytes += cell["bytes"]
    return {"weight_bytes": nbytes, "matvec_ms": seconds * 1e3, "gbs": nbytes / seconds / 1e9,
            "limit_ms": nbytes / bandwidth * 1e3, "of_limit": nbytes / bandwidth / seconds}


SWEEP = ((1, 8, 2, True), (1, 8, 4, True), (1, 16, 4, True), (2, 8, 4, True), (1, 8, 4, False))


def sweep(types: list[str]) -> list[dict]:
    """Launch shapes at M=1 over the 8B layer shapes: one layer's matvec time per config
    (rows per program, chunks per step, warps, byte-pair decoders or the generic tile)."""
    rows = []
    device = torch.device("cuda", torch.cuda.current_device())
    for type_name in types:
        weights = {shape: random_weight(type_name, shape) for shape in set(LAYER.values())}
        x = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 14336)}
        for block_n, cpi, warps, paired in SWEEP:
            total = 0.0
            for shape in LAYER.values():
                w = weights[shape]
                split = quant_kernels.split_for(shape[0], shape[1], device, block_n, cpi)
                total += graph_time(lambda: quant_kernels.qmatvec(
                    x[shape[1]], w, block_n=block_n, split=split, chunks_per_step=cpi, num_warps=warps,
                    paired=paired))
            rows.append({"type": type_name, "block_n": block_n, "chunks_per_step": cpi,
                         "num_warps": warps, "paired": paired, "layer_us": total * 1e6})
    return rows


def prefill(types: list[str]) -> list[dict]:
    rows = []
    for type_name in types:
        for shape in ((4096, 4096), (14336, 4096), (4096, 14336)):
            w = random_weight(type_name, shape)
            dense = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            for m in (512, 4096):
                x = torch.randn(m, shape[1], device="cuda", dtype=torch.bfloat16)
                row = {"type": type_name, "shape": f"{shape[0]}x{shape[1]}", "M": m,
                       "dequant_cublas_us": graph_time(lambda: qmatmul_dequant(x, w)) * 1e6,
                       "bf16_cublas_us": graph_time(lambda: F.linear(x, dense)) * 1e6}
                for bm, bn, warps in ((64, 64, 4), (128, 64, 8)):
                    row[f"fused_{bm}x{bn}_us"] = graph_time(
                        lambda: quant_kernels.qmatmul_fused(x, w, bm, bn, warps)) * 1e6
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(ORDER))
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-prefill", action="store_true")
    args = parser.parse_args()
    types = [t for t in args.types.split(",") if t in BLOCK_TYPES]
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    per_type = bench_types(types, bandwidth)
    print_table(["type", "shape", "M=1 us", "M=1 GB/s", "of copy", "M=4 us", "M=8 us", "M=8 GB/s", "deq+mm M=8 us"],
                [[t, s, c[1]["matvec_us"], c[1]["matvec_gbs"], c[1]["of_copy_bw"], c[4]["matvec_us"],
                  c[8]["matvec_us"], c[8]["matvec_gbs"], c[8]["dequant_matmul_us"]] for t, shapes in per_type.items()
                 for s, c in shapes.items()])
    tokens = {t: token_estimate(per_type, bandwidth, dict.fromkeys(LAYER, t), t) for t in types}
    if {"Q4_K", "Q6_K"} <= set(types):
        six = lambda layer: "Q6_K" if _more_bits(layer) else "Q4_K"  # noqa: E731
        tokens["Q4_K_M"] = token_estimate(per_type, bandwidth, {**dict.fromkeys(LAYER, "Q4_K"),
                                                                "attn_v": six, "ffn_down": six}, "Q6_K")
    print_table(["8B token", "weight GB", "matvec ms", "GB/s", "limit ms", "of limit"],
                [[t, e["weight_bytes"] / 1e9, e["matvec_ms"], e["gbs"], e["limit_ms"], e["of_limit"]]
                 for t, e in tokens.items()])
    result = {"copy_bandwidth_gbs": bandwidth / 1e9, "iters_per_graph": ITERS, "per_type": per_type,
              "token_estimate_8b": tokens,
              "launch": {"per_type": quant_kernels.LAUNCH, "default": quant_kernels.DEFAULT_LAUNCH,
                         "programs_per_sm": quant_kernels.PROGRAMS_PER_SM}}
    write_result("quant_matvec", result)
    if not args.no_sweep:
        result["sweep"] = sweep([t for t in ("Q4_K", "Q6_K", "Q8_0", "Q4_0") if t in types])
        best = sorted(result["sweep"], key=lambda r: (r["type"], r["layer_us"]))
        print_table(["type", "BN", "chunks/step", "warps", "paired", "layer us"],
                    [[r["type"], r["block_n"], r["chunks_per_step"], r["num_warps"], r["paired"], r["layer_us"]]
                     for r in best])
        write_result("quant_matvec", result)
    if not args.no_prefill:
        result["prefill"] = prefill([t for t in ("Q4_K", "Q6_K", "Q8_0") if t in types])
        print_table(list(result["prefill"][0]), [list(r.values()) for r in result["prefill"]])
        write_result("quant_matvec", result)


if __name__ == "__main__":
    main()
