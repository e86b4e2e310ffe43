"""The host VMM backend on real memory: memfd pieces, the zero page, RSS, errors."""
from __future__ import annotations

import ctypes
import faulthandler
import mmap
import os
import signal

import pytest

from kvcached.config import KvcachedConfig
from kvcached.errors import BackendUnavailable, VmmError
from kvcached.rss import rss_bytes
from kvcached.vmm import cuda_available, open_backend
from kvcached.vmm.host import HostBackend

MiB = 1 << 20
PAGE = 2 * MiB


@pytest.fixture
def backend():
    with open_backend(KvcachedConfig(backend="host", page_size=PAGE)) as b:
        yield b


def _committed_bytes(backend: HostBackend) -> int:
    """Memory really allocated in the page memfd (fallocate'd, not yet punched)."""
    return os.fstat(backend._data_fd).st_blocks * 512


def test_auto_picks_host_without_cuda():
    if cuda_available():
        pytest.skip("a CUDA device answers here")
    with open_backend(KvcachedConfig(backend="auto")) as b:
        assert b.name == "host"
        assert b.device.type == "cpu"
        assert b.granularity == mmap.PAGESIZE


def test_forcing_cuda_without_a_device_is_a_typed_error():
    if cuda_available():
        pytest.skip("a CUDA device answers here")
    with pytest.raises(BackendUnavailable):
        open_backend(KvcachedConfig(backend="cuda"))


def test_reserved_range_reads_zeros(backend):
    addr = backend.reserve(4 * PAGE)
    assert ctypes.string_at(addr, 64) == bytes(64)
    assert ctypes.string_at(addr + 4 * PAGE - 64, 64) == bytes(64)
    backend.free_reservation(addr, 4 * PAGE)


def test_map_write_read_unmap_and_rss(backend):
    addr = backend.reserve(4 * PAGE)
    handle = backend.create_page(PAGE)
    before = rss_bytes()
    backend.map_page(addr + PAGE, handle, PAGE)
    assert abs(rss_bytes() - before - PAGE) < mmap.PAGESIZE * 4
    ctypes.memset(addr + PAGE, 0x5A, PAGE)
    assert ctypes.string_at(addr + PAGE, 8) == b"\x5a" * 8
    assert ctypes.string_at(addr, 8) == bytes(8)  # neighbours untouched
    backend.unmap_page(addr + PAGE, PAGE)
    assert abs(rss_bytes() - before) < mmap.PAGESIZE * 4
    assert ctypes.string_at(addr + PAGE, 8) == bytes(8)  # the zero page is back
    backend.release_page(handle)
    backend.free_reservation(addr, 4 * PAGE)


def test_release_really_returns_memory(backend):
    committed = _committed_bytes(backend)
    handles = [backend.create_page(PAGE) for _ in range(3)]
    assert _committed_bytes(backend) - committed == 3 * PAGE
    for h in handles:
        backend.release_page(h)
    assert _committed_bytes(backend) == committed


def test_batched_map_of_adjacent_pages(backend):
    addr = backend.reserve(4 * PAGE)
    handles = [backend.create_page(PAGE) for _ in range(3)]
    backend.map_pages(addr, handles, PAGE)
    for i in range(3):
        ctypes.memset(addr + i * PAGE, i + 1, PAGE)
    assert [ctypes.string_at(addr + i * PAGE + 17, 1)[0] for i in range(4)] == [1, 2, 3, 0]
    backend.unmap_pages(addr, 3, PAGE)
    assert ctypes.string_at(addr, 3 * PAGE) == bytes(3 * PAGE)
    for h in handles:
        backend.release_page(h)
    backend.free_reservation(addr, 4 * PAGE)


def test_page_data_survives_remap_elsewhere(backend):
    """A physical page keeps its bytes when mapped at another address."""
    a = backend.reserve(PAGE)
    b = backend.reserve(PAGE)
    h = backend.create_page(PAGE)
    backend.map_page(a, h, PAGE)
    ctypes.memset(a, 7, PAGE)
    backend.unmap_page(a, PAGE)
    backend.map_page(b, h, PAGE)
    assert ctypes.string_at(b + PAGE - 1, 1) == b"\x07"
    backend.unmap_page(b, PAGE)
    backend.release_page(h)
    backend.free_reservation(a, PAGE)
    backend.free_reservation(b, PAGE)


def test_write_to_zero_page_faults_in_child(backend):
    addr = backend.reserve(2 * PAGE)
    h = backend.create_page(PAGE)
    backend.map_page(addr, h, PAGE)
    ctypes.memset(addr, 3, PAGE)
    pid = os.fork()
    if pid == 0:  # child: write to the unmapped page; must die of SIGSEGV
        faulthandler.disable()  # pytest's traceback dump is noise for an expected fault
        ctypes.memset(addr + PAGE, 9, 16)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
    assert ctypes.string_at(addr + PAGE, PAGE) == bytes(PAGE)  # the write never landed
    assert ctypes.string_at(addr, 4) == b"\x03" * 4
    backend.unmap_page(addr, PAGE)
    backend.release_page(h)
    backend.free_reservation(addr, 2 * PAGE)


@pytest.mark.parametrize("call", [
    lambda b: b.create_page(0),
    lambda b: b.create_page(PAGE + 1),
    lambda b: b.reserve(PAGE // 2),
    lambda b: b.free_reservation(12345, PAGE),
])
def test_bad_arguments_raise_typed_errors(backend, call):
    with pytest.raises(VmmError) as info:
        call(backend)
    assert info.value.code == "EINVAL"


def test_close_is_idempotent():
    b = open_backend(KvcachedConfig(backend="host"))
    b.close()
    b.close()


def test_the_device_is_decided_in_one_place():
    """resolve_backend is what open_backend opens, and a standalone pool owns its backend."""
    from kvcached.standalone import standalone_pool
    from kvcached.vmm import resolve_backend

    assert resolve_backend(KvcachedConfig(backend="host")) == "host"
    assert resolve_backend(KvcachedConfig()) == ("cuda" if cuda_available() else "host")
    pool = standalone_pool(KvcachedConfig(backend="host", page_size=PAGE, reserve_pages=0))
    assert pool.backend.name == "host" and pool.backend.device.type == "cpu"
    pool.release(pool.acquire())
    pool.close()
    assert pool.backend._closed                      # closing the pool closed its backend
