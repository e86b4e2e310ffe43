"""Mapping pages from the reserve and giving them back, against the raw driver
calls in the same run, on both backends, for 2, 8 and 32 MiB pages.

The figures (issue 3): map-from-reserve per page <= 1.15x the raw map +
set-access; give-back rate >= 0.9x the raw unmap + release rate. Ours also
keeps every unmapped address on the read-only zero page, which raw does not.

    PYTHONPATH=. python3 -m benchmarks.vmm [--backend cuda|host|all] [--pages N]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from typing import Any, Callable

import torch

from benchmarks.results_io import print_table, write_result
from benchmarks.staged_vmm import StagedPool, StagedVirtualTensor
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


def measure_ours(backend: VmmBackend, size: int, n: int, single: bool, staged: bool,
                 defer: bool) -> dict[str, float]:
    """Map n pages from a full reserve, then give them back (unmap + pool shrink: the
    memory really returns). `staged`: prepare_pages swapped the zero page out ahead
    (timed apart, as "prepare"); `defer`: the zero page comes back from the zero worker
    (settle() timed apart). The budget is exactly n pages, so no refill runs during
    the timed loop."""
    config = KvcachedConfig(backend=backend.name, page_size=size, budget_bytes=n * size,
                            reserve_pages=n)
    times: dict[str, list[float]] = {"map": [], "give_back": [], "prepare": [], "settle": []}
    spans = [(i, 1) for i in range(n)] if single else [(0, n)]
    # Staged and deferred: the benchmark-only variant (benchmarks/staged_vmm.py);
    # cold: kvcached's own VirtualTensor, what the daemon runs.
    pool_class, tensor_class = (StagedPool, StagedVirtualTensor) if staged or defer else \
        (PagePool, VirtualTensor)
    give_back = {"defer_zero": defer} if staged or defer else {}
    with pool_class(backend, config) as pool, tensor_class(pool, (n * size,), torch.uint8) as vt:
        for _ in range(ROUNDS):
            pool.fill_reserve()
            if staged:
                times["prepare"].append(_timed(lambda: vt.prepare_pages(0, n)))
            times["map"].append(_timed(lambda: [vt.map_pages(f, c) for f, c in spans]))
            times["give_back"].append(_timed(lambda: (
                [vt.unmap_pages(f, c, **give_back) for f, c in spans], pool.shrink())))
            times["settle"].append(_timed(getattr(vt, "settle", lambda: None)))
    return {k: statistics.median(v) * 1e6 / n for k, v in times.items() if v}


# (name, single, staged, defer): staged+deferred is the design, for where the caller
# vouches no kernel reads the pages in between; cold (the zero page swapped inside
# the calls) is what the strict zero page costs everywhere else.
VARIANTS = [
    ("staged_single", True, True, True),
    ("staged_batch", False, True, True),
    ("cold_single", True, False, False),
    ("cold_batch", False, False, False),
]


def _spin_share(calls: Callable[[], None], window_s: float = 0.3) -> float:
    """A second thread counts loop turns, alone and while this thread makes `calls` in
    a loop: the share it keeps is ~1 when the calls release the GIL, ~0 when not."""
    def spin(stop: threading.Event, out: list[int]) -> None:
        count = 0
        while not stop.is_set():
            count += 1
        out.append(count)

    def turns_per_s(work: Callable[[], None] | None) -> float:
        stop, out = threading.Event(), []
        t = threading.Thread(target=spin, args=(stop, out))
        t0 = time.perf_counter()
        t.start()
        while time.perf_counter() - t0 < window_s:
            work() if work else time.sleep(0.001)
        stop.set()
        t.join()
        return out[0] / (time.perf_counter() - t0)

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # hand the GIL back quickly after each call
    try:
        return turns_per_s(calls) / turns_per_s(None)
    finally:
        sys.setswitchinterval(old)


GIL_CHECK_BYTES = {"cuda": 1 * GiB, "host": 64 * MiB}  # host pages are zero-filled: slower


def gil_check(backend: VmmBackend, size: int) -> dict[str, float]:
    """Do create/release (what the refill thread calls) release the GIL?"""
    def create_release() -> None:
        backend.release_page(backend.create_page(size))

    t0 = time.perf_counter()
    create_release()
    return {"bytes": size, "create_release_ms": (time.perf_counter() - t0) * 1e3,
            "spinner_share_kept": _spin_share(create_release)}


def run_backend(name: str, pages: int) -> list[dict[str, object]]:
    rows = []
    for mib in PAGE_SIZES_MIB:
        size = mib * MiB
        with open_backend(KvcachedConfig(backend=name, page_size=size)) as backend:
            r: dict[str, object] = {"backend": name, "page_mib": mib, "pages": pages}
            r.update(measure_raw(backend, size, pages))
            for tag, single, staged, defer in VARIANTS:
                got = measure_ours(backend, size, pages, single, staged, defer)
                r[f"map_{tag}_us"] = got["map"]
                r[f"give_back_{tag}_us"] = got["give_back"]
                r[f"map_{tag}_ratio"] = got["map"] / r["raw_map_us"]
                r[f"give_back_{tag}_rate_ratio"] = r["raw_give_back_us"] / got["give_back"]
                r[f"give_back_{tag}_gib_s"] = size / GiB / (got["give_back"] * 1e-6)
                r[f"settle_{tag}_us"] = got["settle"]
                if staged:
                    r[f"prepare_{tag}_us"] = got["prepare"]
            r["raw_give_back_gib_s"] = size / GiB / (r["raw_give_back_us"] * 1e-6)
        rows.append(r)
    return rows


def print_rows(rows: list[dict[str, object]]) -> None:
    tags = [t for t, *_ in VARIANTS]
    for kind, ratio, goal in (("map", "ratio", "cost ratio, <= 1.15"),
                              ("give_back", "rate_ratio", "rate ratio, >= 0.9")):
        cols = ["backend", "page_mib", f"raw_{kind}_us"] + [
            c for t in tags for c in (f"{kind}_{t}_us", f"{kind}_{t}_{ratio}")]
        print(f"\n{kind}: us per page and {goal} against raw")
        print_table(cols, [[r[c] for c in cols] for r in rows])
    side = ["backend", "page_mib", "prepare_staged_batch_us", "settle_staged_batch_us",
            "raw_give_back_gib_s", "give_back_staged_batch_gib_s", "give_back_cold_batch_gib_s"]
    print("\noff the measured path (us per page), and GiB/s given back")
    print_table(side, [[r[c] for c in side] for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("all", "cuda", "host"), default="all")
    parser.add_argument("--pages", type=int, default=32, help="pages per batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = ["cuda", "host"] if args.backend == "all" else [args.backend]
    names = [n for n in names if n != "cuda" or cuda_available()]
    rows = [r for n in names for r in run_backend(n, args.pages)]
    print_rows(rows)
    gil = {}
    for name in names:
        with open_backend(KvcachedConfig(backend=name)) as backend:
            gil[name] = gil_check(backend, GIL_CHECK_BYTES[name])
    print("\nGIL: a spinning thread's share of turns kept during create+release:", gil)
    write_result("vmm", {"rounds": ROUNDS, "variants": VARIANTS, "rows": rows, "gil_check": gil,
                         "targets": {"map_ratio_max": 1.15, "give_back_rate_ratio_min": 0.9}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
