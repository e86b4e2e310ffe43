"""An unload gives back everything the model took, as NVML sees this process (issue
15: on the H200 an unload gave back 24 MiB of ~1.4 GiB and reloads grew the process
1,368 -> 2,024 MiB). A TorchEngine on a synthetic SmolLM2-135M shape with CUDA graphs
and torch.compile at the daemon's defaults (32 MiB pages), loaded, serving, unloaded,
three times (benchmarks/unload_residue.measure, the benchmark's "full" variant): after
each unload within 64 MiB of the level before the first load (the daemon's, with the
CUDA libraries set up and the kernels' code loaded by a tiny model's round trip:
engines/factory.prepare_device), and no growth over the cycles.
Run: PYTHONPATH=. python3 -m pytest -q -s tests/gpu/test_unload_gpu.py
"""
from __future__ import annotations

import pytest

from benchmarks import unload_residue

SLACK_MIB = 64
CYCLES = 3


def test_unload_returns_the_process_to_its_level_before_the_load():
    pytest.importorskip("pynvml")
    try:
        figures = unload_residue.measure(graphs=True, sdpa_warm=False, cycles=CYCLES)
    except unload_residue.ProcessNotListed as exc:
        pytest.skip(str(exc))
    print(figures)   # context, libraries set up, loaded and after each unload; pool and allocator after
    base = figures["before_load"]
    levels = [figures[f"after_unload_{cycle}"] for cycle in range(CYCLES)]
    assert all(level - base <= SLACK_MIB for level in levels), figures
    assert levels[-1] - levels[0] <= SLACK_MIB, levels   # no growth over the cycles
