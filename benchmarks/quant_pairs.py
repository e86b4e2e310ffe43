"""The stacked experts' pairs kernel (quant_experts.py) at Qwen3-30B-A3B's shapes, launch by launch.

Why: the served Qwen3-30B-A3B step (profile_moe, H200) spent ~15 us in each Q6_K
down projection's pairs (8 pairs of 2,048 rows x 768), ~0.7 TB/s, against ~6 us for
the Q4_K projections, and the step is 0.95x llama.cpp's. The pairs kernel takes
decode's one-row launch (one weight row a program, 8 super-blocks a step), which
at K = 768 (3 super-blocks) leaves 5 of every 8 slots idle. Here every launch of
`quant_dp4a`'s sweep runs each MoE projection shape (8 routed pairs of one token,
the expert ids changing call to call so 128 experts cycle past L2), in a CUDA graph,
and the best three are printed beside the one the code takes now
(`quant_experts.pairs_launch`).

    PYTHONPATH=. python3 -m benchmarks.quant_pairs     # the GPU; results/quant_pairs.json
"""
from __future__ import annotations

import itertools

import torch

from benchmarks.quant_dp4a import launches
from benchmarks.quant_matvec import graph_time, random_weight
from benchmarks.results_io import print_table, write_result
from engines.torch.kernels import quant_experts

EXPERTS, ROUTED, DIM, FFN = 128, 8, 2048, 768      # Qwen3-30B-A3B
# name -> (rows per expert, K, x rows, x_div, gated): gate/up read the token's x, down its pair's [gate | up]
PROJECTIONS = {"gate_up": (FFN, DIM, 1, ROUTED, None), "down": (DIM, FFN, ROUTED, 1, "silu")}
ID_SETS = 16                                        # 16 x 8 distinct ids: every expert, past L2


def pair_time(w, x, id_sets, x_div, gated, launch) -> float:
    turn = itertools.cycle(id_sets)
    return graph_time(lambda: quant_experts._launch_dp4a(x, w, EXPERTS, next(turn), x_div, gated=gated,
                                                         launch=launch), iters=ID_SETS) * 1e6


def sweep_projection(type_name: str, name: str) -> dict:
    rows, k, x_rows, x_div, gated = PROJECTIONS[name]
    w = random_weight(type_name, (EXPERTS * rows, k))
    x = torch.randn(x_rows, 2 * k if gated else k, device="cuda", dtype=torch.bfloat16)
    order = torch.randperm(EXPERTS, generator=torch.Generator().manual_seed(0))
    id_sets = [order[i * ROUTED:(i + 1) * ROUTED].to("cuda", torch.int32) for i in range(ID_SETS)]
    current = quant_experts.pairs_launch(type_name, rows, k)
    timed = [{"launch": launch, "us": pair_time(w, x, id_sets, x_div, gated, launch)}
             for launch in sorted(set(launches(type_name)) | {current})]
    timed.sort(key=lambda r: r["us"])
    now = next(r for r in timed if r["launch"] == current)
    return {"bytes_read": w.nbytes() * ROUTED // EXPERTS, "current": now, "best": timed[:3]}


def main() -> None:
    result: dict = {"shape": {"experts": EXPERTS, "routed": ROUTED, "dim": DIM, "ffn": FFN}, "projections": {}}
    rows = []
    for type_name in ("Q4_K", "Q6_K"):
        for name in PROJECTIONS:
            cell = sweep_projection(type_name, name)
            result["projections"][f"{type_name} {name}"] = cell
            best = cell["best"][0]
            rows.append([f"{type_name} {name}", cell["current"]["launch"], cell["current"]["us"], best["launch"],
                         best["us"], cell["bytes_read"] / (best["us"] / 1e6) / 1e9])
    print_table(["projection", "launch now", "us", "best launch", "us", "best GB/s"], rows)
    write_result("quant_pairs", result)


if __name__ == "__main__":
    main()
