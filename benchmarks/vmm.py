"""Mapping pages from the reserve and giving them back, against the raw driver
calls in the same run, on both backends, for 2, 8 and 32 MiB pages.

The figures (issue 3): map-from-reserve per page <= 1.15x the raw map +
set-access; give-back rate >= 0.9x the raw unmap + release rate. Ours also
keeps every unmapped address on the read-only zero page, which raw does not.

    PYTHONPATH=. python3 benchmarks/vmm.py [--backend cuda|host|all] [--pages N]
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import statistics
import sys
import threading
import time
from typing import Any, Callable

import torch

from benchmarks.results_io import print_table, write_result
from kvcached.config import KvcachedConfig
from kvcached.page_pool import PagePool
from kvcached.virtual_tensor import VirtualTensor
from kvcached.vmm import VmmBackend, cuda_available, open_backend

MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZES_MIB = (2, 8, 32)
ROUNDS = 5


class CudaRaw:
    """The bare driver calls a page costs, on a bare reserved range (no zero page)."""

    def __init__(self, backend: VmmBackend) -> None:
        from kvcached.vmm.cuda import cu, check  # noqa: F401  (benchmarks may call the driver)
        self.cu, self.check, self.b = cu, check, backend

    def reserve(self, size: int) -> int:
        return int(self.check("reserve", self.cu.cuMemAddressReserve(size, 0, 0, 0)))

    def free(self, addr: int, size: int) -> None:
        self.check("free", self.cu.cuMemAddressFree(addr, size))

    def map_each(self, addr: int, handles: list, size: int) -> None:
        cu, check, rw = self.cu, self.check, self.b._rw
        for i, h in enumerate(handles):
            check("m", cu.cuMemMap(addr + i * size, size, 0, h, 0))
            check("s", cu.cuMemSetAccess(addr + i * size, size, rw, 1))

    def give_back_each(self, addr: int, handles: list, size: int) -> None:
        cu, check = self.cu, self.check
        for i, h in enumerate(handles):
            check("u", cu.cuMemUnmap(addr + i * size, size))
            check("r", cu.cuMemRelease(h))


class HostRaw:
    """The bare libc calls: mmap the memfd piece in; mmap PROT_NONE over it and punch."""

    def __init__(self, backend: VmmBackend) -> None:
        from kvcached.vmm import host
        self.h, self.b = host, backend

    def reserve(self, size: int) -> int:
        h = self.h
        return self.b._libc.mmap(None, size, h.PROT_NONE,
                                 h.MAP_PRIVATE | h.MAP_ANONYMOUS | h.MAP_NORESERVE, -1, 0)

    def free(self, addr: int, size: int) -> None:
        self.b._libc.munmap(addr, size)

    def map_each(self, addr: int, handles: list, size: int) -> None:
        h, libc, fd = self.h, self.b._libc, self.b._data_fd
        for i, hd in enumerate(handles):
            libc.mmap(addr + i * size, size, h.PROT_READ | h.PROT_WRITE,
                      h.MAP_SHARED | h.MAP_FIXED | h.MAP_POPULATE, fd, hd.offset)

    def give_back_each(self, addr: int, handles: list, size: int) -> None:
        h, libc = self.h, self.b._libc
        for i, hd in enumerate(handles):
            libc.mmap(addr + i * size, size, h.PROT_NONE,
                      h.MAP_PRIVATE | h.MAP_ANONYMOUS | h.MAP_FIXED | h.MAP_NORESERVE, -1, 0)
            self.b.release_page(hd)  # fallocate(PUNCH_HOLE): the bare release


RAW: dict[str, Callable[[VmmBackend], Any]] = {"cuda": CudaRaw, "host": HostRaw}


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_raw(backend: VmmBackend, size: int, n: int) -> dict[str, float]:
    raw = RAW[backend.name](backend)
    addr = raw.reserve(n * size)
    maps, gives = [], []
    for _ in range(ROUNDS):
        handles = [backend.create_page(size) for _ in range(n)]
        maps.append(_timed(lambda: raw.map_each(addr, handles, size)))
        gives.append(_timed(lambda: raw.give_back_each(addr, handles, size)))
    raw.free(addr, n * size)
    return {"raw_map_us": statistics.median(maps) * 1e6 / n,
            "raw_give_back_us": statistics.median(gives) * 1e6 / n}


def measure_ours(backend: VmmBackend, size: int, n: int, single: bool) -> dict[str, float]:
    """Map n pages from a full reserve, then give them back (unmap + pool shrink).
    The budget is exactly n pages, so no refill runs during the timed loop."""
    config = KvcachedConfig(backend=backend.name, page_size=size, budget_bytes=n * size,
                            reserve_pages=n)
    maps, gives = [], []
    with PagePool(backend, config) as pool, VirtualTensor(pool, (n * size,), torch.uint8) as vt:
        for _ in range(ROUNDS):
            pool.fill_reserve()
            if single:
                maps.append(_timed(lambda: [vt.map_pages(i, 1) for i in range(n)]))
                gives.append(_timed(lambda: ([vt.unmap_pages(i, 1) for i in range(n)],
                                             pool.shrink())))
            else:
                maps.append(_timed(lambda: vt.map_pages(0, n)))
                gives.append(_timed(lambda: (vt.unmap_pages(0, n), pool.shrink())))
    tag = "single" if single else "batch"
    return {f"map_{tag}_us": statistics.median(maps) * 1e6 / n,
            f"give_back_{tag}_us": statistics.median(gives) * 1e6 / n}


def gil_check(backend: VmmBackend, size: int = 1 * GiB, calls: int = 4) -> dict[str, float]:
    """While a thread creates and releases big pages, does this thread keep running?
    Counts loop turns per second here, alone and during the driver calls."""
    def spin(seconds: float) -> float:
        count, t_end = 0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            count += 1
        return count / seconds

    alone = spin(0.2)
    busy_s = [0.0]

    def worker() -> None:
        t0 = time.perf_counter()
        for _ in range(calls):
            backend.release_page(backend.create_page(size))
        busy_s[0] = time.perf_counter() - t0

    t = threading.Thread(target=worker)
    count, t0 = 0, time.perf_counter()
    t.start()
    while t.is_alive():
        count += 1
    elapsed = time.perf_counter() - t0
    t.join()
    return {"driver_calls_s": busy_s[0], "turns_per_s_alone": alone,
            "turns_per_s_during_calls": count / elapsed,
            "share_of_turns_kept": count / elapsed / alone}


def run_backend(name: str, pages: int) -> list[dict[str, object]]:
    rows = []
    for mib in PAGE_SIZES_MIB:
        size = mib * MiB
        with open_backend(KvcachedConfig(backend=name, page_size=size)) as backend:
            r: dict[str, object] = {"backend": name, "page_mib": mib, "pages": pages}
            r.update(measure_raw(backend, size, pages))
            r.update(measure_ours(backend, size, pages, single=True))
            r.update(measure_ours(backend, size, pages, single=False))
            for tag in ("single", "batch"):
                r[f"map_{tag}_ratio"] = r[f"map_{tag}_us"] / r["raw_map_us"]
                r[f"give_back_{tag}_rate_ratio"] = r["raw_give_back_us"] / r[f"give_back_{tag}_us"]
                r[f"give_back_{tag}_gib_s"] = size / GiB / (r[f"give_back_{tag}_us"] * 1e-6)
            r["raw_give_back_gib_s"] = size / GiB / (r["raw_give_back_us"] * 1e-6)
        rows.append(r)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("all", "cuda", "host"), default="all")
    parser.add_argument("--pages", type=int, default=32, help="pages per batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = ["cuda", "host"] if args.backend == "all" else [args.backend]
    names = [n for n in names if n != "cuda" or cuda_available()]
    rows = [r for n in names for r in run_backend(n, args.pages)]
    cols = ["backend", "page_mib", "raw_map_us", "map_single_us", "map_single_ratio",
            "map_batch_us", "map_batch_ratio", "raw_give_back_us", "give_back_single_us",
            "give_back_single_rate_ratio", "give_back_batch_us", "give_back_batch_rate_ratio",
            "raw_give_back_gib_s", "give_back_batch_gib_s"]
    print_table(cols, [[r[c] for c in cols] for r in rows])
    gil = {}
    if "cuda" in names:
        with open_backend(KvcachedConfig(backend="cuda")) as backend:
            gil = gil_check(backend)
        print("GIL during cuMemCreate/cuMemRelease of 1 GiB:", gil)
    write_result("vmm", {"rounds": ROUNDS, "rows": rows, "gil_check": gil,
                         "targets": {"map_ratio_max": 1.15, "give_back_rate_ratio_min": 0.9}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
