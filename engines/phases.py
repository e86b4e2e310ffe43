"""How long each part of a model's load took: what a cold first request waits for.

An engine records its load in phases (`with phases.phase("read"): ...`) and keeps
the result as `engine.load_phases` ({phase: seconds}, in load order), which
/api/ps and /control/models show and benchmarks/cold_start.py reads. On the
torch engine: read (file read, dequantize or repack, weights to the device),
kv (the virtual KV tensor), runner (fused projections, the attention kernel's
self-check), compile_capture (torch.compile of the decode step and the first
bucket's CUDA graph; the other buckets are captured later, while idle:
capture_while_idle). Two entries are parts of others, not additions to them:
attention_check (within runner) and prefill_warm_up (within compile_capture).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class LoadPhases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {name: round(s, 4) for name, s in self.seconds.items()}
