"""Where the host's part of a decode step goes, virtual KV against static.

benchmarks/decode.py measures tok/s; its graph replay time is the same for both
KV kinds, so any gap between them is host work or a stall. This times every
step of a batch-1 greedy decode one by one, and apart from it the time spent in
the store's `ensure` (the only call that maps pages), so a gap shows as either
a uniform cost per step or spikes where pages were mapped.

    python -m benchmarks.decode_host [--models llama-3.2-1b] [--steps 256]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks.decode import make_store, prefill
from benchmarks.results_io import print_table, write_result
from engines.torch.serve.runner import Runner
from engines.torch.serve.scheduler import Sequence, StepPlan


class TimedEnsure:
    """Wraps a store's ensure: how often it was called and the seconds it took."""

    def __init__(self, store) -> None:
        self.inner, self.calls, self.seconds = store.ensure, 0, 0.0
        store.ensure = self

    def __call__(self, slot: int, n_tokens: int) -> None:
        t = time.perf_counter()
        try:
            self.inner(slot, n_tokens)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - t


def time_steps(model, kind: str, steps: int) -> dict:
    cfg = model.cfg
    store = make_store(kind, cfg, model.dtype, model.device, 8, 1024)
    try:
        runner = Runner(model, store)
        gen = torch.Generator().manual_seed(0)
        seq = Sequence(prompt=torch.randint(0, cfg.vocab_size, (32,), generator=gen).tolist(),
                       max_tokens=10 ** 6, slot=0)
        prefill(runner, [seq])
        plan = StepPlan(decodes=(seq,))
        ensure = TimedEnsure(store)
        held_before = store.held_bytes
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            token = runner.run(plan).argmax(-1).tolist()[0]
            times.append(1000 * (time.perf_counter() - t))
            seq.num_computed += 1
            seq.output.append(token)
        times = times[3:]                       # the first steps may still capture
        median = statistics.median(times)
        return {"step_ms_median": round(median, 4), "step_ms_mean": round(statistics.fmean(times), 4),
                "step_ms_p90": round(sorted(times)[int(0.9 * len(times))], 4),
                "step_ms_max": round(max(times), 3),
                "slow_steps": sum(t > 2 * median for t in times),
                "ensure_calls": ensure.calls, "ensure_ms_total": round(1000 * ensure.seconds, 3),
                "pages_mapped": (store.held_bytes - held_before) // store.layout.page_size,
                "tok_s": round(1000 * len(times) / sum(times), 1)}
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    parser.add_argument("--steps", type=int, default=256)
    args = parser.parse_args()
    from engines.torch.model.configs import named_config
    from engines.torch.model.synthetic import synthetic_model

    results: dict = {"models": {}}
    rows = []
    for name in args.models.split(","):
        model = synthetic_model(named_config(name), torch.device("cuda"), torch.bfloat16)
        for kind in ("static", "virtual", "static", "virtual"):    # twice each: drift shows
            out = time_steps(model, kind, args.steps)
            results["models"].setdefault(name, {}).setdefault(kind, []).append(out)
            rows.append([name, kind, out["tok_s"], out["step_ms_median"], out["step_ms_p90"],
                         out["step_ms_max"], out["slow_steps"], out["ensure_calls"],
                         out["ensure_ms_total"], out["pages_mapped"]])
        del model
        gc.collect()
        torch.cuda.empty_cache()
    print_table(["model", "kv", "tok/s", "median ms", "p90 ms", "max ms", "slow", "ensures",
                 "ensure ms", "pages"], rows)
    print(f"results: {write_result('decode_host', {**results, 'settings': vars(args)})}")


if __name__ == "__main__":
    main()
