"""Batch 1 of a compiled model: a graph of its own where that replays faster.

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

A third way keeps both the compile's fusions and the one-row kernels: the compiled
batch-2 graph captured under `quant_ops.repeated_rows` ("repeated"), where each
quantized projection computes the request's row alone and repeats it (the padded row
is the same row). Which wins depends on the model, and is measured where it runs, by
replaying the graphs: batch 1 leaves the compiled batch-2 graph only for one faster by
more than `MARGIN`. Two ways in:
- the engine's load (issue 22: a cold model answers before anything compiles):
  `eager_first` captures the eager batch-1 graph and nothing compiled, so the first
  request runs as soon as the weights are on the device; the serving loop compiles and
  captures the rest while idle, and `decide`, after the first compiled bucket, keeps
  batch 1 eager, moves it to a repeated graph, or drops it for the batch-2 graph;
- a full warm-up (benchmarks, tests): `choose` captures both batch-1 graphs after the
  compiled buckets and decides at once.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

REPLAYS = 10     # per graph, after one unmeasured replay: a 8B step is ~5 ms
MARGIN = 0.03    # a batch-1 graph must win by this much (replays vary by ~1-2%)


def beats_compiled(own_ms: float, compiled_ms: float) -> bool:
    """Whether batch 1 should replay a graph of its own (eager or repeated) taking own_ms
    rather than the compiled one padded to 2."""
    return own_ms < compiled_ms * (1.0 - MARGIN)


def replay_ms(graph, slot: int, replays: int = REPLAYS) -> float:
    """Milliseconds a replay of the DecodeGraph takes on the GPU, its inputs staged first at
    slot's position 0 (mapped and free to overwrite): a graph's last inputs may be another
    sequence's, whose pages may be gone or reused since."""
    graph.run([0], [0], [slot])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def applies(runner) -> bool:
    """Compiled, graphed and batching: batch 1 would otherwise run as 2."""
    return runner.is_compiled and runner.use_graphs and runner.batch_buckets[-1] > 1


def eager_first(runner, slot: int) -> bool:
    """At load: batch 1's eager graph now (on slot, mapped at position 0), every compiled
    bucket left pending for the idle loop. False (nothing done) where it does not apply."""
    from engines.torch.serve.runner import DecodeGraph

    if not applies(runner) or 1 in runner.batch_buckets:
        return False
    read_len = runner.read_buckets[0]
    runner.batch_buckets.insert(0, 1)
    runner.graphs[(1, read_len)] = DecodeGraph(runner, 1, read_len, [0], [0], [slot])
    runner.pending = [key for key in runner.warm_keys() if key not in runner.graphs]
    runner.batch_one_undecided = True
    return True


def decide(runner, slot: int) -> None:
    """Once the first compiled bucket at the first read length is captured: batch 1 keeps
    its eager graph, or moves to a compiled graph that computes its one row alone
    ("repeated"), or runs as batch 2 (its graphs dropped), whichever replays fastest."""
    if not runner.batch_one_undecided:
        return
    read_len = runner.read_buckets[0]
    eager = runner.graphs.get((1, read_len))
    compiled_batch = next((b for b in runner.batch_buckets if b > 1), None)
    compiled = runner.graphs.get((compiled_batch, read_len))
    if eager is None or compiled is None:
        return
    runner.batch_one_undecided = False
    _settle(runner, {"eager": eager, "repeated": _repeated(runner, read_len, slot), "compiled": compiled},
            compiled_batch, read_len, slot)


def choose(runner, slot: int) -> None:
    """After a full warm-up captured the compiled buckets: capture batch 1 both ways on slot
    and keep the fastest of them and the first compiled bucket; the runner's other read
    lengths then get batch-1 graphs of that kind (pending). A no-op where it does not apply."""
    from engines.torch.serve.runner import DecodeGraph

    read_len = runner.read_buckets[0]
    compiled = runner.graphs.get((runner.batch_buckets[0], read_len))
    if not applies(runner) or compiled is None or 1 in runner.batch_buckets:
        return
    runner.batch_buckets.insert(0, 1)
    candidates = {"eager": DecodeGraph(runner, 1, read_len, [0], [0], [slot]),
                  "repeated": _repeated(runner, read_len, slot), "compiled": compiled}
    runner.graphs[(1, read_len)] = candidates["eager"]
    runner.pending.extend((1, r) for r in runner.read_buckets[1:])
    _settle(runner, candidates, runner.batch_buckets[1], read_len, slot)


def _repeated(runner, read_len: int, slot: int):
    from engines.torch.serve.runner import DecodeGraph

    return DecodeGraph(runner, 2, read_len, [0], [0], [slot], repeated=True)


def _settle(runner, candidates: dict, compiled_batch: int, read_len: int, slot: int) -> None:
    """Keep the fastest candidate for batch 1 and close the others (and any batch-1 graph
    captured at another read length: it is captured again, of the kind kept)."""
    times = {kind: replay_ms(graph, slot) for kind, graph in candidates.items()}
    kind = fastest(times)
    log.info("batch 1: eager graph %.2f ms a step, compiled computing its one row %.2f ms, compiled as "
             "batch %d %.2f ms: %s kept", times["eager"], times["repeated"], compiled_batch,
             times["compiled"], kind)
    old = {key: runner.graphs.pop(key) for key in [k for k in runner.graphs if k[0] == 1]}
    kept = candidates.get(kind)
    for graph in {id(g): g for g in (*old.values(), candidates["eager"], candidates["repeated"])}.values():
        if graph is not kept:
            graph.close()
    if kind == "compiled":
        runner.batch_buckets.remove(1)
        runner.pending = [key for key in runner.pending if key[0] != 1]
        return
    runner.batch_one_kind = kind
    runner.graphs[(1, read_len)] = kept
    runner.pending.extend(key for key in old if key != (1, read_len) and key not in runner.pending)


def fastest(times: dict[str, float]) -> str:
    """The kind batch 1 keeps: the compiled batch-2 graph unless another is faster by MARGIN."""
    best = min(("eager", "repeated"), key=times.__getitem__)
    return best if beats_compiled(times[best], times["compiled"]) else "compiled"
