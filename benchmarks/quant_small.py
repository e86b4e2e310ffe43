"""The matvecs of a small model's step and an MoE's attention: which launch each should get (issue 16, 17).

SmolLM2-135M's batch-1 step is 289 kernels, 149 of them matvecs at ~5 us each (H200,
logs/profile_q4km_h200.log): three quarters of the step, on weights of 0.1-2 MB whose
bytes take well under a microsecond to read. Their time is latency: the launch, the
chain of dependent loads, the reduction. Qwen3-30B-A3B's k/v/o projections (float
matvec, 4.6 us each) are the same case on bigger weights. For each such shape and its
Q4_K_M type (hidden sizes that are not whole super-blocks fall back to Q5_0/Q8_0 as
llama.cpp's quantizer does), at one row of x, in one run:
- what qlinear runs today, and a trivial one-store kernel (the floor of one launch in
  a graph) and bf16 cuBLAS on a dense weight of the shape, as references;
- a sweep of the float matvec's launch (rows a program, chunks a step, warps) and,
  for the types the integer-dot kernels serve, of theirs.
Every time is a CUDA graph of distinct weights (more bytes than the L2 holds, as a
real step reads them), per call. JSON to benchmarks/results/quant_small.json.

    python3 -m benchmarks.quant_small [--shapes smollm2] [--no-sweep]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from benchmarks.quant_matvec import graph_time, random_weight
from benchmarks.results_io import print_table, write_result
from engines.torch.kernels import quant_dp4a, quant_kernels, quant_ops

# (model, projection) -> (type, (out, in)); SmolLM2-135M Q4_K_M as llama.cpp quantizes it
SHAPES: dict[tuple[str, str], tuple[str, tuple[int, int]]] = {
    ("smollm2", "qk"): ("Q5_0", (768, 576)),
    ("smollm2", "v"): ("Q8_0", (192, 576)),
    ("smollm2", "o"): ("Q5_0", (576, 576)),
    ("smollm2", "gate_up"): ("Q5_0", (3072, 576)),
    ("smollm2", "down_q6k"): ("Q6_K", (576, 1536)),
    ("smollm2", "down_q4k"): ("Q4_K", (576, 1536)),
    ("qwen3-30b-a3b", "kv"): ("Q4_K", (1024, 2048)),
    ("qwen3-30b-a3b", "v_q6k"): ("Q6_K", (512, 2048)),
    ("qwen3-30b-a3b", "o"): ("Q4_K", (2048, 4096)),
}
BYTES_PER_GRAPH = 192 << 20     # distinct weights a graph reads: past the H200's 60 MB L2
MAX_CALLS = 400


def distinct_time(fn, weights: list, x: torch.Tensor) -> float:
    """Seconds per fn(x, w), one graph calling it on each weight once."""
    calls = iter(itertools.cycle(weights))
    return graph_time(lambda: fn(x, next(calls)), iters=len(weights))


def weights_for(type_name: str, shape: tuple[int, int]) -> list:
    first = random_weight(type_name, shape)
    count = min(MAX_CALLS, max(8, BYTES_PER_GRAPH // first.nbytes()))
    return [first] + [random_weight(type_name, shape) for _ in range(count - 1)]


def floor_us(x: torch.Tensor, calls: int) -> float:
    """One launch that stores one value: what any kernel of the step costs at least."""
    out = torch.empty(1, device="cuda")
    return graph_time(lambda: out.fill_(1.0), iters=calls) * 1e6


def float_launches() -> list[tuple[int, int, int]]:
    return list(itertools.product((1, 2, 4), (1, 2, 4), (1, 2, 4)))


def dp4a_launches() -> list[tuple[int, int, int, int]]:
    return [(rows, blocks, 1, warps) for rows, blocks, warps in itertools.product((1, 2, 4), (4, 8, 16), (1, 2, 4))]


def best(rows: list[dict], n: int = 3) -> list[dict]:
    return sorted(rows, key=lambda r: r["us"])[:n]


def measure_shape(type_name: str, shape: tuple[int, int], sweep: bool) -> dict:
    weights = weights_for(type_name, shape)
    x = torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16)
    dense = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(min(len(weights), 64))]
    row = {"type": type_name, "shape": list(shape), "calls_per_graph": len(weights),
           "qlinear_us": distinct_time(lambda x, w: quant_ops.qlinear(x, w), weights, x) * 1e6,
           "qlinear_path": "dp4a" if quant_dp4a.chosen(weights[0], 1) else "float",
           "cublas_bf16_us": distinct_time(lambda x, w: F.linear(x, w), dense, x) * 1e6,
           "floor_us": floor_us(x, len(weights))}
    if not sweep:
        return row
    runs = []
    for launch in float_launches():
        def call(x, w, launch=launch):
            return quant_kernels.qmatvec(x, w, block_n=launch[0], chunks_per_step=launch[1], num_warps=launch[2])
        runs.append({"launch": list(launch), "us": distinct_time(call, weights, x) * 1e6})
    row["float_best"] = best(runs)
    if quant_dp4a.supports(weights[0], 1):
        runs = []
        for launch in dp4a_launches():
            def call(x, w, launch=launch):
                return quant_dp4a.qmatvec_dp4a(x, w, *launch)
            runs.append({"launch": list(launch), "us": distinct_time(call, weights, x) * 1e6})
        row["dp4a_best"] = best(runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2,qwen3-30b-a3b", help="models whose shapes to run")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--name", default="quant_small")
    args = parser.parse_args()
    models = args.shapes.split(",")
    results: dict = {}
    table = []
    for (model, proj), (type_name, shape) in SHAPES.items():
        if model not in models:
            continue
        row = measure_shape(type_name, shape, not args.no_sweep)
        results[f"{model} {proj}"] = row
        table.append([f"{model} {proj}", type_name, f"{shape[0]}x{shape[1]}", row["qlinear_path"],
                      row["qlinear_us"], row["floor_us"], row["cublas_bf16_us"],
                      _first(row.get("float_best")), _first(row.get("dp4a_best"))])
        torch.cuda.empty_cache()
    print_table(["shape", "type", "NxK", "path", "qlinear us", "floor us", "bf16 cuBLAS us",
                 "float best (BN,CPI,warps) us", "dp4a best (BN,SB,U,warps) us"], table)
    path = write_result(args.name, {"shapes": results})
    print(f"wrote {path}")


def _first(rows: list[dict] | None) -> str:
    if not rows:
        return "-"
    return f"{tuple(rows[0]['launch'])} {rows[0]['us']:.2f}"


if __name__ == "__main__":
    main()
