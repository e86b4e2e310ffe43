"""What a decode step's sampling costs the host, by context length: the histories handed
to `sampling.sample` built as lists (`prompt + output` a row, as before) against read in
place (`Sequence.history`, serve/token_history.py), in the same run.

Greedy rows read no history, sampled rows with penalties only their last repeat_last_n
tokens, yet the lists copied every row's whole conversation every step. This times what
`ServingLoop._sample` does between the logits and the tokens (the histories, then
`sample`) at batch 1 and 8, for prompts of 512 to 16k tokens, greedy and with a repeat
penalty; logits on the CPU (the argmax is the same both ways; on the GPU it is a kernel).

    python -m benchmarks.sample_host [--vocab 49152] [--repeats 200]
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.results_io import print_table, write_result
from engines.torch.serve.sampling import sample
from engines.torch.serve.scheduler import Sequence
from engines.types import SamplingParams

KINDS = {"greedy": SamplingParams(temperature=0.0),
         "repeat penalty": SamplingParams(temperature=0.0, repeat_penalty=1.1, repeat_last_n=64)}


def per_step_us(seqs: list[Sequence], logits: torch.Tensor, params: SamplingParams, as_lists: bool,
                repeats: int) -> float:
    """Median microseconds of one step's histories + sample over `repeats` steps."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        histories = [s.tokens for s in seqs] if as_lists else [s.history for s in seqs]
        sample(logits, [params] * len(seqs), histories, [None] * len(seqs))
        times.append(time.perf_counter() - t)
    return 1e6 * sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    rows, out = [], []
    for context in (512, 4096, 16384):
        for batch in (1, 8):
            seqs = [Sequence(prompt=list(range(context)), max_tokens=256, slot=i) for i in range(batch)]
            for seq in seqs:
                seq.output = list(range(100))
            logits = torch.randn(batch, args.vocab)
            for kind, params in KINDS.items():
                lists = per_step_us(seqs, logits, params, True, args.repeats)
                view = per_step_us(seqs, logits, params, False, args.repeats)
                out.append({"context": context, "batch": batch, "sampling": kind, "lists_us": round(lists, 1),
                            "in_place_us": round(view, 1), "lists_over_in_place": round(lists / view, 2)})
                rows.append([context, batch, kind, f"{lists:.1f}", f"{view:.1f}", f"{lists / view:.2f}x"])
    print_table(["context", "batch", "sampling", "lists us", "in place us", "ratio"], rows)
    write_result("sample_host", {"settings": vars(args), "rows": out})


if __name__ == "__main__":
    main()
