"""The kernel warm-up the daemon runs when it opens the GPU (engines/torch/kernel_warm_up.py):
a tiny model's round trip through the real torch engine, on the page pool the models use,
that gives every page back. On the CPU this checks the round trip and what it leaves; the
code it loads into a CUDA context is measured by tests/gpu/test_unload_gpu.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from engines import factory
from engines.config import EngineConfig
from engines.torch import kernel_warm_up
from kvcached.config import KvcachedConfig
from kvcached.standalone import standalone_pool


@pytest.fixture()
def host_pool():
    pool = standalone_pool(KvcachedConfig(backend="host", page_size=64 << 10, reserve_pages=0))
    yield pool
    pool.close()


def test_the_warm_up_runs_each_head_size_and_gives_every_page_back(host_pool, monkeypatch):
    loaded: list[int] = []
    real_config = kernel_warm_up.warm_up_config
    monkeypatch.setattr(kernel_warm_up, "warm_up_config",
                        lambda head_dim: loaded.append(head_dim) or real_config(head_dim))
    seconds = kernel_warm_up.warm_up_engine_kernels(host_pool, EngineConfig(torch_cuda_graphs=False))
    assert loaded == list(kernel_warm_up.WARM_UP_HEAD_DIMS)
    assert seconds > 0
    host_pool.shrink()
    assert host_pool.held() == 0     # the tiny models' KV pages all back


def test_the_warm_up_shape_is_a_valid_small_model():
    for head_dim in kernel_warm_up.WARM_UP_HEAD_DIMS:
        cfg = kernel_warm_up.warm_up_config(head_dim)
        assert cfg.head_dim == head_dim and cfg.num_params < 2_000_000   # a few MiB in bf16


def test_prepare_device_leaves_a_cpu_pool_alone(host_pool, monkeypatch):
    monkeypatch.setattr(kernel_warm_up, "warm_up_engine_kernels",
                        lambda pool, served: pytest.fail("no kernels to load on the host backend"))
    factory.prepare_device(host_pool, EngineConfig())
    factory.prepare_device(None)


def test_the_warm_up_decodes_as_many_slots_as_the_served_models(host_pool, monkeypatch):
    from engines.torch import engine as torch_engine

    slots: list[int] = []
    real_engine = torch_engine.TorchEngine
    monkeypatch.setattr(torch_engine, "TorchEngine",
                        lambda info, config, pool: slots.append(config.torch_num_slots) or real_engine(info, config, pool))
    kernel_warm_up.warm_up_engine_kernels(host_pool, EngineConfig(torch_num_slots=3, torch_cuda_graphs=False))
    assert slots == [3] * len(kernel_warm_up.WARM_UP_HEAD_DIMS)


def test_import_compiler_imports_dynamo_and_inductor_in_a_fresh_process():
    """What a Runner's first torch.compile wrap would import on the first load's path (~2 s
    on the CPU build here) is imported at device open instead; nothing is compiled."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            "from engines.torch.kernel_warm_up import import_compiler\n"
            "import_compiler()\n"
            "assert {'torch._dynamo', 'torch._inductor'} <= set(sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0, done.stderr[-2000:]
