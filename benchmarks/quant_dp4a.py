"""Batch-1 matvec on integer dot products (dp4a) against the float matvec, on 8B shapes (issue 16).

`engines/torch/kernels/quant_dp4a.py` quantizes x to int8 per 32 (q8_1) and
multiplies four weights' quants by four int8 activations per `dp4a`, as llama.cpp's
mmvq; the float matvec (`quant_kernels.qmatvec`) is instruction-bound on 4- and
6-bit types. In one run, on Llama-3.1-8B's shapes:
- per type (Q4_K, Q6_K, Q4_0, Q8_0) and shape, both kernels' time, GB/s of
  quantized weight read and the fraction of the device's copy bandwidth. Each
  time is a CUDA graph cycling through enough copies of the weight to pass the
  L2 cache (50 MB on the H100), so no read is an L2 hit a real step would miss;
- a sweep of each type's dp4a launch (rows per program from 1, as llama.cpp's mmvq, to
  16; warps; steps unrolled; blocks per step follow: one slot a thread) per layer shape,
  beside the float path: the launch and the routing each shape should get;
- one whole 8B Q4_K_M token's matvecs at M=1 (32 layers of distinct weights,
  Q6_K for attn_v/ffn_down in half the layers and the head, as llama.cpp's
  quantizer mixes them) in one graph, float path and dp4a, against the
  bandwidth limit: the number decode pays before attention and launches.

    python3 -m benchmarks.quant_dp4a [--no-sweep]
"""
from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.quant_matvec import HEAD, LAYER, N_LAYERS, _more_bits, copy_bandwidth, graph_time, random_weight
from benchmarks.results_io import print_table, write_result
from engines.torch.kernels import quant_dp4a, quant_kernels, quant_ops

L2_PASS_BYTES = 256 << 20        # weights cycled per graph: several times the H100's 50 MB L2
SLOTS = {"Q4_K": 4, "Q6_K": 4, "Q4_0": 1, "Q8_0": 1}


def cycled_time(fn, weights: list, x: torch.Tensor, calls: int = 24) -> float:
    """Seconds per fn(x, w) call, a CUDA graph of `calls` calls cycling through `weights`."""
    turn = itertools.cycle(weights)
    return graph_time(lambda: fn(x, next(turn)), iters=calls)


def copies(type_name: str, shape: tuple[int, int]) -> list:
    first = random_weight(type_name, shape)
    return [first] + [random_weight(type_name, shape) for _ in range(max(0, L2_PASS_BYTES // first.nbytes()))]


def float_matvec(x, w):
    """What qlinear ran before dp4a: the float matvec, or past its rows dequantize + cuBLAS."""
    if x.shape[0] <= quant_kernels.matvec_max_rows(w.type_name):
        return quant_kernels.qmatvec(x, w)
    return quant_ops.qmatmul_dequant(x, w)


def dp4a_matvec(x, w):
    return quant_dp4a.qmatvec_dp4a(x, w)


def compare_shape(type_name: str, shape: tuple[int, int], bandwidth: float) -> dict:
    """M=1: both kernels against the copy bandwidth; M=2 and 8 (decode's batch): times."""
    weights = copies(type_name, shape)
    nbytes = weights[0].nbytes()
    out: dict = {"bytes": nbytes}
    for m in (1, 2, 8):
        x = torch.randn(m, shape[1], device="cuda", dtype=torch.bfloat16)
        t_float, t_int = cycled_time(float_matvec, weights, x), cycled_time(dp4a_matvec, weights, x)
        key = "" if m == 1 else f"m{m}_"
        out.update({f"{key}float_us": t_float * 1e6, f"{key}dp4a_us": t_int * 1e6, f"{key}speedup": t_float / t_int})
    out.update({"float_of_copy": nbytes / (out["float_us"] / 1e6) / bandwidth,
                "dp4a_of_copy": nbytes / (out["dp4a_us"] / 1e6) / bandwidth})
    return out


def launches(type_name: str) -> list[tuple[int, int, int, int]]:
    """(rows, blocks per step, unroll, warps) with rows x blocks x slots = the threads. One or
    two rows a program is llama.cpp's mmvq shape: what a weight of few rows needs to fill SMs."""
    out = []
    for rows, warps, unroll in itertools.product((1, 2, 4, 8, 16), (1, 2, 4), (1, 2)):
        blocks = 32 * warps // (rows * SLOTS[type_name])
        if blocks >= 1 and blocks * rows * SLOTS[type_name] == 32 * warps and (unroll == 1 or rows >= 4):
            out.append((rows, blocks, unroll, warps))
    return out


def sweep(type_name: str, rows_of_x: int = 1) -> dict:
    """Per 8B layer shape in this type, at rows_of_x rows of x: each dp4a launch's time (weights
    cycled past L2) and the float path's, best first: what `quant_dp4a.LAUNCH_ONE_ROW_OF_X`,
    `LAUNCH` and the row thresholds should say per shape."""
    out = {}
    for shape in sorted(set(LAYER.values())):
        weights = copies(type_name, shape)
        x = torch.randn(rows_of_x, shape[1], device="cuda", dtype=torch.bfloat16)
        rows = []
        for launch in launches(type_name):
            def call(x, w, launch=launch):
                return quant_dp4a.qmatvec_dp4a(x, w, *launch)
            rows.append({"launch": launch, "us": cycled_time(call, weights, x) * 1e6})
        rows.sort(key=lambda r: r["us"])
        out[f"{shape[0]}x{shape[1]}"] = {"float_us": cycled_time(float_matvec, weights, x) * 1e6, "best": rows[:3]}
        del weights
    return out


def token_mix() -> list[tuple[str, tuple[int, int]]]:
    """An 8B Q4_K_M token's matvecs: (type, shape), llama.cpp's mix of Q4_K and Q6_K."""
    out = []
    for layer in range(N_LAYERS):
        for name, shape in LAYER.items():
            six = name in ("attn_v", "ffn_down") and _more_bits(layer)
            out.append(("Q6_K" if six else "Q4_K", shape))
    return out + [("Q6_K", HEAD)]


def token_weights() -> list[tuple[object, torch.Tensor]]:
    """The token's weights, distinct per layer (4.9 GB), with an x for each."""
    return [(random_weight(type_name, shape), torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16))
            for type_name, shape in token_mix()]


def token_time(weights: list, fn) -> float:
    def step(_x, _w):
        for w, x in weights:
            fn(x, w)
    return cycled_time(step, [None], None, calls=1)


def measure_token(bandwidth: float) -> dict:
    weights = token_weights()
    nbytes = sum(w.nbytes() for w, _ in weights)
    out = {"weight_gb": nbytes / 1e9, "limit_ms": nbytes / bandwidth * 1e3}
    for name, fn in (("float", float_matvec), ("dp4a", dp4a_matvec)):
        seconds = token_time(weights, fn)
        out[name] = {"matvec_ms": seconds * 1e3, "of_limit": nbytes / bandwidth / seconds}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="only the per-shape launch sweep")
    parser.add_argument("--name", default="quant_dp4a", help="results file name")
    parser.add_argument("--sweep-rows", default="1", help="rows of x the sweep runs at (1,2,8: decode's batches)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s; dp4a launches {quant_dp4a.LAUNCH}")
    result: dict = {"copy_bandwidth_gbs": bandwidth / 1e9, "launch": quant_dp4a.LAUNCH,
                    "launch_one_row_of_x": quant_dp4a.LAUNCH_ONE_ROW_OF_X, "shapes": {}}
    if not args.sweep_only:
        measure_kernels(bandwidth, result, args.name)
    if not args.no_sweep:
        for rows_of_x in map(int, args.sweep_rows.split(",")):
            key = "sweep" if rows_of_x == 1 else f"sweep_m{rows_of_x}"
            result[key] = {}
            for type_name in quant_dp4a.TYPES:      # written after each type: a cut-off run keeps what ran
                result[key][type_name] = sweep(type_name, rows_of_x)
                write_result(args.name, result)
            print_table([f"type shape, M={rows_of_x}", "float us", "best dp4a us",
                         "launch (rows, blocks, unroll, warps)", "next"],
                        [[f"{t} {shape}", cell["float_us"], cell["best"][0]["us"], cell["best"][0]["launch"],
                          cell["best"][1]["launch"]] for t, shapes in result[key].items()
                         for shape, cell in shapes.items()])


def measure_kernels(bandwidth: float, result: dict, name: str) -> None:
    """The 8B token's matvecs, then each type and shape at M=1, 2, 8: float path against dp4a."""
    token = measure_token(bandwidth)
    result["token_8b_q4_k_m"] = token
    print_table(["8B Q4_K_M token, M=1", "weight GB", "matvec ms", "limit ms", "of limit"],
                [[k, token["weight_gb"], token[k]["matvec_ms"], token["limit_ms"], token[k]["of_limit"]]
                 for k in ("float", "dp4a")])
    write_result(name, result)
    for type_name in quant_dp4a.TYPES:
        for shape in sorted(set(LAYER.values()) | {HEAD}):
            result["shapes"][f"{type_name} {shape[0]}x{shape[1]}"] = compare_shape(type_name, shape, bandwidth)
    print_table(["type shape", "MB", "float us", "of copy", "dp4a us", "of copy", "speedup", "M=2 x", "M=8 x"],
                [[k, c["bytes"] / 1e6, c["float_us"], c["float_of_copy"], c["dp4a_us"], c["dp4a_of_copy"],
                  c["speedup"], c["m2_speedup"], c["m8_speedup"]] for k, c in result["shapes"].items()])
    write_result(name, result)


if __name__ == "__main__":
    main()
