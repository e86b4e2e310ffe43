"""An unload gives back everything the model took, as NVML sees this process (issue
15: on the H200 an unload gave back 24 MiB of ~1.4 GiB and reloads grew the process
1,368 -> 2,024 MiB). A TorchEngine on a synthetic SmolLM2-135M shape with CUDA graphs
and torch.compile at the daemon's defaults (32 MiB pages), loaded, serving, unloaded,
three times: after each unload within 64 MiB of the level before the first load
(the daemon's, with the CUDA libraries set up: engines/torch/cuda_libraries.py),
and no growth over the cycles. Run: PYTHONPATH=. python3 -m pytest -q tests/gpu/test_unload_gpu.py
"""
from __future__ import annotations

import gc
import logging
import os

import pytest
import torch

from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.factory import prepare_device
from engines.torch.engine import TorchEngine
from engines.types import FinishReason, GenerateRequest, RequestKind, SamplingParams
from kvcached.config import KvcachedConfig
from kvcached.standalone import standalone_pool

MiB = 1 << 20
SLACK = 64 * MiB
log = logging.getLogger(__name__)


def nvml_used_by_me() -> int:
    pynvml = pytest.importorskip("pynvml")
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == os.getpid():
            return int(proc.usedGpuMemory or 0)
    pytest.skip("NVML does not list this process (PID namespace)")


def test_unload_returns_the_process_to_its_level_before_the_load():
    torch.cuda.init()
    # The daemon's one backend and pool, at its defaults (32 MiB pages), and the CUDA
    # libraries set up as the daemon does when it opens the GPU: its level before any load.
    pool = standalone_pool(KvcachedConfig(backend="cuda"))
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    context = nvml_used_by_me()
    prepare_device(pool)
    base = nvml_used_by_me()
    print(f"CUDA context {context / MiB:.0f} MiB; with the libraries set up {base / MiB:.0f} MiB")
    levels, loaded = [], []
    for cycle in range(3):
        engine = TorchEngine(ModelInfo(name="smollm2", path="", source="synthetic",
                                       metadata={"config": "smollm2-135m"}),
                             EngineConfig(torch_num_slots=8, torch_max_context=2048), pool)
        engine.load()
        request = GenerateRequest(kind=RequestKind.COMPLETION, prompt="the tide " * 20,
                                  sampling=SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        assert list(engine.generate(request))[-1].finish_reason is FinishReason.LENGTH
        loaded.append(nvml_used_by_me())
        assert engine.unload() > 0
        del engine
        gc.collect()
        pool.shrink()                              # the broker's first step: the reserve
        levels.append(nvml_used_by_me())
        print(f"cycle {cycle}: before load {base / MiB:.0f} MiB, loaded {loaded[-1] / MiB:.0f} MiB, "
              f"after unload {levels[-1] / MiB:.0f} MiB; pool {pool.stats()}, "
              f"allocator reserved {torch.cuda.memory_reserved() / MiB:.0f} MiB")
    pool.close()
    assert all(level - base <= SLACK for level in levels), (base, loaded, levels)
    assert levels[-1] - levels[0] <= SLACK, levels   # no growth over the cycles
