"""How many physical cores this process may run on: llama.cpp's default thread count.

Hyper-threads share one core's execution units, and llama.cpp's threads spin
while they wait, so llama.cpp (and its own tools) default to one thread per
physical core. Linux reports the topology in sysfs; elsewhere, and when sysfs
cannot be read, the logical count of this process's CPUs is the answer.
"""
from __future__ import annotations

import os
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")


def usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:   # macOS and Windows have no affinity call
        return set(range(os.cpu_count() or 1))


def physical_cores(sysfs: Path = SYSFS_CPU) -> int:
    """Distinct (package, core) pairs among the CPUs this process may use."""
    cpus = usable_cpus()
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))
