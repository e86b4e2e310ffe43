"""What each CUDA VMM driver call costs, per handle, alone and spanning adjacent
mappings: the facts the cuda backend's batching is designed by.

Run on a CUDA machine: PYTHONPATH=. python3 -m benchmarks.vmm_driver_costs
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

from cuda.bindings import driver as cu

from benchmarks.results_io import print_table, write_result
from kvcached.vmm import cuda_available
from kvcached.vmm.cuda import READ_ONLY, READ_WRITE, access_desc, allocation_prop, check

MiB = 1 << 20
N = 32          # handles per measurement
ROUNDS = 5


def _us(fn: Callable[[], None], calls: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6 / calls


def one_round(size: int, dev: int) -> dict[str, float]:
    prop = allocation_prop(dev)
    rw, ro = [access_desc(dev, READ_WRITE)], [access_desc(dev, READ_ONLY)]
    span = N * size
    va = int(check("reserve", cu.cuMemAddressReserve(span, size, 0, 0)))
    addrs = [va + i * size for i in range(N)]
    handles: list = []
    r: dict[str, float] = {}
    r["create"] = _us(lambda: handles.extend(check("c", cu.cuMemCreate(size, prop, 0)) for _ in range(N)), N)
    r["map"] = _us(lambda: [check("m", cu.cuMemMap(a, size, 0, h, 0)) for a, h in zip(addrs, handles)], N)
    r["set_access_rw_each"] = _us(lambda: [check("s", cu.cuMemSetAccess(a, size, rw, 1)) for a in addrs], N)
    r["unmap_each"] = _us(lambda: [check("u", cu.cuMemUnmap(a, size)) for a in addrs], N)
    # spanning calls over N adjacent mappings
    for a, h in zip(addrs, handles):
        check("m", cu.cuMemMap(a, size, 0, h, 0))
    r["set_access_rw_span"] = _us(lambda: check("s", cu.cuMemSetAccess(va, span, rw, 1)), N)
    r["unmap_span"] = _us(lambda: check("u", cu.cuMemUnmap(va, span)), N)
    # the zero page: one handle mapped read-only at every address
    zero = handles[0]
    r["map_zero"] = _us(lambda: [check("m", cu.cuMemMap(a, size, 0, zero, 0)) for a in addrs], N)
    r["set_access_ro_span"] = _us(lambda: check("s", cu.cuMemSetAccess(va, span, ro, 1)), N)
    r["unmap_zero_each"] = _us(lambda: [check("u", cu.cuMemUnmap(a, size)) for a in addrs], N)
    for a in addrs:
        check("m", cu.cuMemMap(a, size, 0, zero, 0))
    r["set_access_ro_each"] = _us(lambda: [check("s", cu.cuMemSetAccess(a, size, ro, 1)) for a in addrs], N)
    # changing the access of a mapping that has one (read-only -> read/write)
    r["set_access_ro_to_rw_each"] = _us(lambda: [check("s", cu.cuMemSetAccess(a, size, rw, 1)) for a in addrs], N)
    r["ctx_synchronize_idle"] = _us(lambda: [check("y", cu.cuCtxSynchronize()) for _ in addrs], N)
    r["unmap_zero_span"] = _us(lambda: check("u", cu.cuMemUnmap(va, span)), N)
    # unmapping a mapping whose access was never set
    for a, h in zip(addrs, handles):
        check("m", cu.cuMemMap(a, size, 0, h, 0))
    r["unmap_no_access_span"] = _us(lambda: check("u", cu.cuMemUnmap(va, span)), N)
    r["release"] = _us(lambda: [check("r", cu.cuMemRelease(h)) for h in handles], N)
    check("free", cu.cuMemAddressFree(va, span))
    return r


def main() -> int:
    if not cuda_available():
        print("vmm_driver_costs: no CUDA device here, nothing to measure")
        return 0
    check("init", cu.cuInit(0))
    dev = check("dev", cu.cuDeviceGet(0))
    ctx = check("ctx", cu.cuDevicePrimaryCtxRetain(dev))
    check("set", cu.cuCtxSetCurrent(ctx))
    results: dict[str, dict[str, float]] = {}
    for mib in (2, 8, 32):
        rounds = [one_round(mib * MiB, 0) for _ in range(ROUNDS)]
        results[f"{mib}MiB"] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    keys = list(next(iter(results.values())))
    print_table(["us per handle"] + list(results), [[k] + [results[s][k] for s in results] for k in keys])
    write_result("vmm_driver_costs", {"handles_per_call": N, "rounds": ROUNDS, "us_per_handle": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
