"""`TokenHistory`: a sequence's prompt and output read as one list, without building it.

Sampling hands every row its history (penalties read the last `repeat_last_n` tokens of
it). Building `prompt + output` each step copied the whole conversation for every row, even
for greedy rows that read none of it: an agent's 16k-token prompt at batch 8 is 128k list
entries copied a step on the host, beside a GPU step of a few milliseconds
(benchmarks/sample_host.py measures both). The view reads only what is asked.
"""
from __future__ import annotations

from collections.abc import Sequence


class TokenHistory(Sequence):
    """prompt + output, read in place; slices copy only the tokens they hold."""

    __slots__ = ("prompt", "output")

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        self.prompt, self.output = prompt, output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            stop, split = max(start, stop), len(self.prompt)     # an empty slice stays empty
            if start >= split:
                return self.output[start - split:stop - split]
            return self.prompt[start:min(stop, split)] + self.output[:max(0, stop - split)]
        length = len(self)
        i = index + length if index < 0 else index
        if not 0 <= i < length:
            raise IndexError("token history index out of range")
        split = len(self.prompt)
        return self.prompt[i] if i < split else self.output[i - split]
