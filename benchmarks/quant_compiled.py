"""Quantized decode as the daemon runs it: compiled, against the same model eager (issue 16).

`benchmarks/quant_decode.py` times the torch engine's decode step uncompiled beside
llama.cpp; the daemon compiles it (engines/torch/engine.py: Runner's default on
CUDA), which fuses the norms, RoPE, residuals and activations between the
quantized matvecs. This runs both on the same Q4_K_M-typed file in one process:
decode tok/s at batch 1 and 8, the graph replay of one step, the warm-up the
compile costs, and the bandwidth fraction. The file is written straight as random
Q4_K/Q6_K blocks in llama.cpp's Q4_K_M mix (`shape_gguf.named_block_shape`), so
it needs no llama.cpp build; llama.cpp's figures on llama.cpp-quantized files of
the same shapes come from `quant_decode.json` where it is there (another run:
said so beside them).

    python3 -m benchmarks.quant_compiled [--models llama-3.1-8b,smollm2-135m] [--budget-s 300]
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path

import torch

from benchmarks.decode import bench_engine, measure_bandwidth
from benchmarks.quant_decode import load_measured
from benchmarks.results_io import print_table, write_result
from benchmarks.shape_gguf import named_block_shape

log = logging.getLogger("benchmarks.quant_compiled")
_ROOT = Path(__file__).resolve().parent.parent
PEER = _ROOT / "benchmarks" / "results" / "quant_decode.json"


def peer_figures(model: str) -> dict:
    """llama.cpp's decode on the llama.cpp-quantized Q4_K_M file of these shapes, if committed."""
    if not PEER.exists():
        return {}
    record = json.loads(PEER.read_text())
    row = record.get("files", {}).get(f"{model} Q4_K_M", {}).get("llama_cpp", {})
    return {"device": record.get("device"), "time_utc": record.get("time_utc"),
            **{k: row.get(k) for k in ("decode_b1_tok_s", "decode_b8_tok_s")}}


def bench_model(name: str, args: argparse.Namespace, bandwidth: float, deadline: float, row: dict, save) -> None:
    """Fills row (eager, then compiled), calling save() after each: a cut-off run keeps what ran."""
    path = named_block_shape(name)
    model, loaded = load_measured(path)
    row.update(loaded, llama_cpp_other_run=peer_figures(name))
    try:
        for compiled in (False, True):
            if time.perf_counter() > deadline:
                row["skipped_compiled" if compiled else "skipped_eager"] = "time budget"
                continue
            run = bench_engine(model, "virtual", argparse.Namespace(**{**vars(args), "compile": compiled}))
            mean_ctx = 32 + 3 + 1.5 * args.steps
            step_bytes = row["weights_bytes"] + model.cfg.kv_bytes_per_token(model.dtype.itemsize) * mean_ctx
            run["bandwidth_fraction_b1"] = run["decode_b1_tok_s"] * step_bytes / bandwidth
            row["compiled" if compiled else "eager"] = run
            log.info("%s %s: %s", name, "compiled" if compiled else "eager", run)
            save()
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-3.1-8b,smollm2-135m")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--triton", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget_s - 60
    bandwidth = measure_bandwidth(torch.device("cuda"))
    result: dict = {"bandwidth_gb_s": bandwidth / 1e9, "models": {}}
    for name in args.models.split(","):
        if time.perf_counter() > deadline:
            result["models"][name] = {"skipped": "time budget"}
            continue
        result["models"][name] = {}
        bench_model(name, args, bandwidth, deadline, result["models"][name],
                    lambda: write_result("quant_compiled", result))
    rows = []
    for name, row in result["models"].items():
        for mode in ("eager", "compiled"):
            run = row.get(mode) or {}
            peer = row.get("llama_cpp_other_run") or {}
            rows.append([name, mode, run.get("decode_b1_tok_s"), run.get("decode_b8_tok_s"),
                         run.get("graph_replay_b1_ms"), run.get("warmup_b1_s"), run.get("bandwidth_fraction_b1"),
                         peer.get("decode_b1_tok_s"), peer.get("decode_b8_tok_s")])
    print_table(["model Q4_K_M", "step", "b1 tok/s", "b8 tok/s", "b1 replay ms", "b1 warm-up s", "bw frac",
                 "llama.cpp b1 (other run)", "llama.cpp b8"], rows)
    write_result("quant_compiled", result)


if __name__ == "__main__":
    main()
