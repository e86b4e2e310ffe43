"""The cuda VMM backend, virtual tensors and the pool on a real CUDA device:
the host tests' properties, a CUDA graph replayed across unmap/remap, NVML
seeing this process's memory rise and fall, and recoverable out-of-memory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvcached.config import KvcachedConfig
from kvcached.errors import DeviceOutOfMemory, PoolExhausted, VmmError
from kvcached.page_pool import PagePool
from kvcached.virtual_tensor import VirtualTensor
from kvcached.vmm import open_backend

MiB = 1 << 20
PAGE = 2 * MiB
ROOT = Path(__file__).resolve().parents[2]


def _config(**kw) -> KvcachedConfig:
    return KvcachedConfig(**{"backend": "cuda", "page_size": PAGE, "budget_bytes": 512 * MiB,
                             "reserve_pages": 0, **kw})


@pytest.fixture(scope="module")
def backend():
    with open_backend(_config()) as b:
        yield b


@pytest.fixture
def pool(backend):
    with PagePool(backend, _config()) as p:
        yield p


def test_auto_picks_cuda(backend):
    with open_backend(KvcachedConfig(backend="auto")) as b:
        assert b.name == "cuda" and b.device.type == "cuda"
    assert backend.granularity > 0 and PAGE % backend.granularity == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_map_write_read_unmap_zero_reads(pool, dtype):
    per_page = PAGE // torch.empty((), dtype=dtype).element_size()
    with VirtualTensor(pool, (6, per_page), dtype) as vt:  # one row per page
        assert vt.tensor.device.type == "cuda" and vt.tensor.data_ptr() == vt.addr
        assert not vt.tensor.any().item()  # all zero page
        vt.map_pages(1, 3)  # one batch: adjacent pages
        vt.tensor[1:4] = 2
        torch.cuda.synchronize()
        assert vt.unmap_pages(2, 1) == PAGE
        rows = (vt.tensor != 0).any(dim=1).tolist()
        assert rows[:4] == [False, True, False, True]
        vt.map_pages(0, 6)
        vt.tensor.fill_(1)
        assert vt.tensor.float().sum().item() == vt.tensor.numel()
        assert vt.tensor.data_ptr() == vt.addr  # the address never moves


def test_prepared_pages_and_deferred_zero(backend):
    """The benchmark-only staged tensor (benchmarks/staged_vmm.py) on the device."""
    from benchmarks.staged_vmm import StagedPool, StagedVirtualTensor

    with StagedPool(backend, _config()) as pool, \
            StagedVirtualTensor(pool, (8, PAGE), torch.uint8) as vt:  # one row per page
        vt.map_pages(0, 2)
        vt.tensor[:2] = 5
        assert vt.prepare_pages(2, 3) == 3 and pool.held() == 2 * PAGE
        assert vt.map_pages(2, 2) == 2 * PAGE  # prepared: the zero page is already out
        vt.tensor[2:4] = 6
        vt.unmap_pages(4, 1)  # the last prepared page gets its zero page back
        torch.cuda.synchronize()
        assert vt.tensor.sum(dim=1).tolist() == [5 * PAGE] * 2 + [6 * PAGE] * 2 + [0] * 4
        assert vt.unmap_pages(0, 8, defer_zero=True) == 4 * PAGE
        assert pool.held() == 0  # memory is back before the zero page is
        vt.map_pages(1, 1)  # its zero page cancelled or awaited
        vt.tensor[1] = 7
        vt.settle()
        torch.cuda.synchronize()
        assert vt.tensor.sum(dim=1).tolist() == [0, 7 * PAGE] + [0] * 6


def test_reserve_refilled_from_background_thread(backend):
    config = _config(reserve_pages=4)
    with PagePool(backend, config) as pool:
        pool.fill_reserve()
        with VirtualTensor(pool, (8 * PAGE,), torch.uint8) as vt:
            vt.map_pages(0, 4)  # from the reserve
            vt.tensor[: 4 * PAGE] = 3
            for _ in range(1000):  # the refill thread needs its own current context
                if pool.reserved() == 4 * PAGE:
                    break
                torch.cuda._sleep(1000)
                torch.cuda.synchronize()
            assert pool.reserved() == 4 * PAGE
            assert int(vt.tensor[: 4 * PAGE].sum().item()) == 3 * 4 * PAGE


def test_all_or_nothing_over_budget(backend):
    config = _config(budget_bytes=3 * PAGE)
    with PagePool(backend, config) as pool, VirtualTensor(pool, (8 * PAGE,), torch.uint8) as vt:
        vt.map_pages(0, 1)
        with pytest.raises(PoolExhausted):
            vt.map_pages(2, 4)
        assert vt.mapped_pages() == [0]
        assert not vt.tensor[PAGE:].any().item()


def test_driver_errors_are_typed(backend):
    with pytest.raises(VmmError) as info:
        backend.free_reservation(0x1000, PAGE)
    assert info.value.code.startswith("CUDA_ERROR_")
    with pytest.raises(VmmError) as info:
        backend.create_page(backend.granularity + 1)
    assert info.value.code == "CUDA_ERROR_INVALID_VALUE"


def test_out_of_memory_is_recoverable(backend):
    big = 4 << 30
    handles = []
    try:
        with pytest.raises(DeviceOutOfMemory):
            for _ in range(2 * backend.total_bytes() // big + 2):
                handles.append(backend.create_page(big))
    finally:
        for h in handles:
            backend.release_page(h)
    h = backend.create_page(PAGE)  # the device works on
    backend.release_page(h)


def test_cuda_graph_replays_across_unmap_and_remap(pool):
    with VirtualTensor(pool, (4, PAGE // 4), torch.float32) as vt:  # [pages, floats per page]
        vt.map_pages(0, 4)
        vt.tensor.copy_(torch.arange(1, 5, device="cuda", dtype=torch.float32)[:, None])
        out = torch.zeros(4, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out.copy_(vt.tensor.sum(dim=1))  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(vt.tensor.sum(dim=1))
        n = PAGE // 4
        graph.replay()
        torch.cuda.synchronize()
        assert out.tolist() == [n * 1.0, n * 2.0, n * 3.0, n * 4.0]
        vt.unmap_pages(1, 2)
        graph.replay()  # reads the zero page where pages 1 and 2 were
        torch.cuda.synchronize()
        assert out.tolist() == [n * 1.0, 0.0, 0.0, n * 4.0]
        vt.map_pages(1, 2)
        vt.tensor[1:3] = 7
        graph.replay()
        torch.cuda.synchronize()
        assert out.tolist() == [n * 1.0, n * 7.0, n * 7.0, n * 4.0]


def _nvml_used_by_me() -> int:
    import pynvml

    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == os.getpid():
            return int(proc.usedGpuMemory or 0)
    pytest.skip("NVML does not list this process (PID namespace)")


def test_nvml_sees_memory_rise_and_fall(pool):
    pynvml = pytest.importorskip("pynvml")
    pynvml.nvmlInit()
    try:
        with VirtualTensor(pool, (128 * PAGE,), torch.uint8) as vt:
            torch.cuda.synchronize()
            before = _nvml_used_by_me()
            vt.map_pages(0, 128)
            risen = _nvml_used_by_me() - before
            assert abs(risen - 128 * PAGE) <= 2 * PAGE
            vt.unmap_pages(0, 128)  # reserve_pages=0: every page is released
            assert abs(_nvml_used_by_me() - before) <= 2 * PAGE
    finally:
        pynvml.nvmlShutdown()


CHILD = textwrap.dedent("""
    import torch
    from kvcached.config import KvcachedConfig
    from kvcached.page_pool import PagePool
    from kvcached.virtual_tensor import VirtualTensor
    from kvcached.vmm import open_backend
    config = KvcachedConfig(backend="cuda", page_size=2 << 20, budget_bytes=64 << 20, reserve_pages=0)
    backend = open_backend(config)
    vt = VirtualTensor(PagePool(backend, config), (4, 2 << 20), torch.uint8)
    vt.map_pages(0, 1)
    vt.tensor[0] = 5
    torch.cuda.synchronize()
    print("BEFORE", int(vt.tensor[2].sum()), flush=True)
    try:
        vt.tensor[2].fill_(1)  # the read-only zero page
        torch.cuda.synchronize()
        print("WRITE LANDED", int(vt.tensor[2].sum()), flush=True)
    except Exception as exc:
        print("FAULT", type(exc).__name__, exc, flush=True)
""")


def test_write_to_zero_page_fails_loudly_in_child():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert "BEFORE 0" in out, out
    assert "WRITE LANDED" not in out, out
    assert "FAULT" in out or proc.returncode != 0, out
