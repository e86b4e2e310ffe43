"""Decode-sized projections: cuBLAS (F.linear) against engines.torch.small_linear.

Each variant runs one call per weight copy in a CUDA graph (as a decode step
does, layer after layer), with enough copies that the weights do not sit in
L2; microseconds per call and the bandwidth reached. Shapes: the projections
of SmolLM2-135M and Llama-3.2-1B at 2 and 8 rows (decode's batch buckets).

    python -m benchmarks.small_gemm
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.results_io import print_table, write_result
from engines.torch.small_linear import pick_blocks, small_linear

SHAPES = {  # name: (N, K)
    "smollm2 qkv": (960, 576), "smollm2 o": (576, 576), "smollm2 gate_up": (3072, 576),
    "smollm2 down": (576, 1536), "1b qkv": (3072, 2048), "1b o": (2048, 2048),
    "1b down": (2048, 8192),
}
CONFIGS = [(16, 64, 4), (16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4), (16, 128, 2)]


def graph_us(fn_per_copy, copies: int, reps: int = 20) -> float:
    """Microseconds per call: `copies` calls captured in one graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn_per_copy(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn_per_copy(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return 1000 * start.elapsed_time(end) / (reps * copies)


def main() -> None:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    rows, table = {}, []
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(8, min(200, (256 << 20) // nbytes))   # > L2 (50 MB) in all
        weights = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(copies)]
        for m in (2, 8):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            outs = {"cublas": graph_us(lambda i: F.linear(x, weights[i]), copies)}
            for cfg in CONFIGS:
                outs["triton %dx%d w%d" % cfg] = graph_us(lambda i: small_linear(x, weights[i], None, cfg), copies)
            outs["triton picked"] = graph_us(lambda i: small_linear(x, weights[i]), copies)
            err = (small_linear(x, weights[0]).float() - F.linear(x, weights[0]).float()).abs().max().item()
            best = min((v, c) for c, v in outs.items() if c.startswith("triton "))
            rows[f"{name} m{m}"] = {"n": n, "k": k, "us": {c: round(v, 2) for c, v in outs.items()},
                                    "max_abs_err": err, "picked": pick_blocks(n, k)}
            table.append([f"{name} m{m}", round(outs["cublas"], 2), round(outs["triton picked"], 2),
                          round(best[0], 2), best[1], round(nbytes / outs["triton picked"] / 1e3),
                          f"{err:.2g}"])
        del weights
    print_table(["shape", "cublas us", "triton us", "best us", "best config", "GB/s", "max err"], table)
    print(f"results: {write_result('small_gemm', {'shapes': rows})}")


if __name__ == "__main__":
    main()
