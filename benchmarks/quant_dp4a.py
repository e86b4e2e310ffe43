"""Q4_K at batch 1: the integer-dot (dp4a) matvec against the float matvec, on 8B shapes (issue 16).

`engines/torch/kernels/quant_dp4a.py` quantizes x to int8 per 32 (q8_1) and
multiplies four 4-bit weights by four int8 activations per `dp4a`, as llama.cpp's
mmvq; the float matvec (`quant_kernels.qmatvec`) is instruction-bound on 4-bit
types. In one run, on Llama-3.1-8B's layer shapes and its head:
- each shape's time for both kernels, GB/s of quantized weight read and the
  fraction of the device's copy bandwidth, and how far the two outputs differ
  (relative to the output's scale: x's int8 rounding, which llama.cpp has too);
- a sweep of the dp4a launch (rows per program, super-blocks per step, warps),
  one layer's matvecs per config;
- the weight-read time of one 8B Q4_K_M token at M=1 (Q4_K layers, Q6_K for
  attn_v/ffn_down in half the layers and the head) with the float matvec
  everywhere, and with dp4a for the Q4_K tensors, against the bandwidth limit.
Every time is a CUDA graph of calls replayed (benchmarks/quant_matvec.graph_time).

    python3 -m benchmarks.quant_dp4a [--no-sweep]
"""
from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.quant_matvec import HEAD, LAYER, N_LAYERS, _more_bits, copy_bandwidth, graph_time, random_weight
from benchmarks.results_io import print_table, write_result
from engines.torch.kernels import quant_dp4a, quant_kernels

SHAPES = sorted(set(LAYER.values()) | {HEAD})
SWEEP = list(itertools.product((1, 2, 4), (1, 2, 4), (1, 2, 4)))   # rows/program, super-blocks/step, warps


def compare_shape(shape: tuple[int, int], bandwidth: float, six: bool = False) -> dict:
    """Float matvec and dp4a at M=1 on one random Q4_K weight (Q6_K: float only, for the mix)."""
    w = random_weight("Q6_K" if six else "Q4_K", shape)
    x = torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16)
    t_float = graph_time(lambda: quant_kernels.qmatvec(x, w))
    cell = {"bytes": w.nbytes(), "float_us": t_float * 1e6, "float_of_copy": w.nbytes() / t_float / bandwidth}
    if not six:
        t_int = graph_time(lambda: quant_dp4a.qmatvec_q4k_dp4a(x, w))
        got, want = quant_dp4a.qmatvec_q4k_dp4a(x, w).float(), quant_kernels.qmatvec(x, w).float()
        cell.update({"dp4a_us": t_int * 1e6, "dp4a_of_copy": w.nbytes() / t_int / bandwidth,
                     "speedup": t_float / t_int,
                     "max_diff_of_scale": float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))})
    return cell


def sweep() -> list[dict]:
    """One 8B layer's Q4_K matvecs (q, k, v, o, gate, up, down) per dp4a launch."""
    weights = [random_weight("Q4_K", shape) for shape in LAYER.values()]
    xs = [torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16) for shape in LAYER.values()]
    rows = []
    for block_n, step, warps in SWEEP:
        total = sum(graph_time(lambda w=w, x=x: quant_dp4a.qmatvec_q4k_dp4a(
            x, w, block_n=block_n, super_blocks_per_step=step, num_warps=warps)) for w, x in zip(weights, xs))
        rows.append({"block_n": block_n, "super_blocks_per_step": step, "num_warps": warps,
                     "layer_us": total * 1e6})
    return rows


def q4_k_m_token(q4: dict, q6: dict, bandwidth: float, use_dp4a: bool) -> dict:
    """Weight-read time of one 8B Q4_K_M token at M=1 from the per-shape times."""
    seconds = nbytes = 0.0
    for layer in range(N_LAYERS):
        for name, shape in LAYER.items():
            six = name in ("attn_v", "ffn_down") and _more_bits(layer)
            cell = (q6 if six else q4)[shape]
            seconds += (cell["dp4a_us"] if use_dp4a and not six else cell["float_us"]) / 1e6
            nbytes += cell["bytes"]
    head = q6[HEAD]
    seconds, nbytes = seconds + head["float_us"] / 1e6, nbytes + head["bytes"]
    return {"weight_gb": nbytes / 1e9, "matvec_ms": seconds * 1e3, "limit_ms": nbytes / bandwidth * 1e3,
            "of_limit": nbytes / bandwidth / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s; dp4a launch {quant_dp4a.LAUNCH}")
    q4 = {shape: compare_shape(shape, bandwidth) for shape in SHAPES}
    q6 = {shape: compare_shape(shape, bandwidth, six=True) for shape in (LAYER["attn_v"], LAYER["ffn_down"], HEAD)}
    print_table(["Q4_K shape", "float us", "of copy", "dp4a us", "of copy", "speedup", "max diff"],
                [[f"{s[0]}x{s[1]}", c["float_us"], c["float_of_copy"], c["dp4a_us"], c["dp4a_of_copy"],
                  c["speedup"], c["max_diff_of_scale"]] for s, c in q4.items()])
    tokens = {"float": q4_k_m_token(q4, q6, bandwidth, False), "dp4a": q4_k_m_token(q4, q6, bandwidth, True)}
    print_table(["8B Q4_K_M token", "weight GB", "matvec ms", "limit ms", "of limit"],
                [[k, t["weight_gb"], t["matvec_ms"], t["limit_ms"], t["of_limit"]] for k, t in tokens.items()])
    result = {"copy_bandwidth_gbs": bandwidth / 1e9, "launch": quant_dp4a.LAUNCH,
              "q4_k": {f"{s[0]}x{s[1]}": c for s, c in q4.items()},
              "q6_k_float": {f"{s[0]}x{s[1]}": c for s, c in q6.items()}, "token_estimate_8b_q4_k_m": tokens}
    write_result("quant_dp4a", result)
    if not args.no_sweep:
        result["sweep"] = sorted(sweep(), key=lambda r: r["layer_us"])
        print_table(["BN", "super-blocks/step", "warps", "layer us"],
                    [[r["block_n"], r["super_blocks_per_step"], r["num_warps"], r["layer_us"]]
                     for r in result["sweep"][:10]])
        write_result("quant_dp4a", result)


if __name__ == "__main__":
    main()
