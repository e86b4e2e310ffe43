"""Batch 1 of a compiled model: its own eager graph where that replays faster.

Compiled, the runner's smallest batch bucket is 2 (Dynamo specializes size-1
dimensions: a bucket of 1 would compile the whole model a second time, ~35 s on the
H100), and a lone request runs as two identical rows. That was free while every
matrix-vector kernel cost the same at one row and two; it is not since the dp4a
kernels have a launch of their own for one row of x (`quant_dp4a.LAUNCH_ONE_ROW_OF_X`,
about half the float matvec's time on an 8B model's 4096-row weights). Measured on
the H100 (benchmarks/results/quant_decode_compiled_h100.json against
quant_decode_h100_one_row_dp4a.json): Llama-3.1-8B Q4_K_M at batch 1 replays its
step in 5.14 ms compiled (as batch 2) and 4.09 ms eager at batch 1; SmolLM2-135M,
bound by kernel launches, 1.07 ms compiled and 2.03 ms eager.

So which wins depends on the model, and is measured where it runs: after the first
compiled bucket is captured, an eager graph at batch 1 is captured beside it (no
compile: a fraction of a second) and both are replayed; the eager one is kept for
batch 1 only if it is faster by more than `MARGIN`.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

REPLAYS = 10     # per graph, after one unmeasured replay: a 8B step is ~5 ms
MARGIN = 0.03    # the eager graph must win by this much (replays vary by ~1-2%)


def keep_eager(eager_ms: float, compiled_ms: float) -> bool:
    """Whether batch 1 should replay the eager graph rather than the compiled one padded to 2."""
    return eager_ms < compiled_ms * (1.0 - MARGIN)


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = REPLAYS) -> float:
    """Milliseconds a replay of graph takes on the GPU (its inputs as they were staged)."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def choose(runner, slot: int) -> None:
    """Capture batch 1 eagerly on slot (mapped at position 0, free to overwrite) and keep it
    if it beats the first compiled bucket; the runner's other read lengths then get batch-1
    graphs of their own (pending). A no-op unless compiled, graphed and with a compiled
    bucket captured at the first read length."""
    from engines.torch.serve.runner import DecodeGraph

    read_len = runner.read_buckets[0]
    compiled = runner.graphs.get((runner.batch_buckets[0], read_len))
    if not (runner.is_compiled and runner.use_graphs and compiled is not None) or 1 in runner.batch_buckets:
        return
    eager = DecodeGraph(runner, 1, read_len, [0], [0], [slot])
    eager_ms, compiled_ms = replay_ms(eager.graph), replay_ms(compiled.graph)
    kept = keep_eager(eager_ms, compiled_ms)
    log.info("batch 1: eager graph %.2f ms a step, compiled (as batch %d) %.2f ms: %s kept",
             eager_ms, runner.batch_buckets[0], compiled_ms, "eager" if kept else "compiled")
    if not kept:
        eager.close()
        return
    runner.graphs[(1, read_len)] = eager
    runner.batch_buckets.insert(0, 1)
    runner.pending.extend((1, r) for r in runner.read_buckets[1:])
