"""Reading this process's resident memory and the system's free memory from /proc.

The host backend's proof that pages really come and go is RSS: mapped pieces
of the memfd show up as RssShmem, given-back ones leave it. The broker's host
monitor reads MemAvailable from the same place.
"""
from __future__ import annotations

from pathlib import Path

KiB = 1024


def _read_kib_fields(path: str) -> dict[str, int]:
    """Lines like 'VmRSS:   1234 kB' -> {'VmRSS': 1234 * 1024}."""
    fields: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key.strip()] = int(parts[0]) * KiB
    return fields


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A kB field of /proc/<pid>/status (VmRSS, RssAnon, RssFile, RssShmem...) in bytes."""
    return _read_kib_fields(f"/proc/{pid}/status")[field]


def smaps_rollup_bytes(field: str, pid: int | str = "self") -> int:
    """A field of /proc/<pid>/smaps_rollup (Rss, Pss_Shmem, Anonymous...) in bytes.
    Exact: the kernel walks the page tables to answer."""
    return _read_kib_fields(f"/proc/{pid}/smaps_rollup")[field]


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of the process in bytes, exact (from smaps_rollup).
    /proc/<pid>/status VmRSS is cheaper but, since Linux 6.2 keeps RSS in per-cpu
    counters, can lag by many pages: too coarse to check one page."""
    return smaps_rollup_bytes("Rss", pid)


def rss_shmem_bytes(pid: int | str = "self") -> int:
    """Resident shared-memory pages (where memfd pages count) from /proc/<pid>/status:
    cheap, approximate (see rss_bytes)."""
    return status_bytes("RssShmem", pid)


def meminfo_bytes(field: str) -> int:
    """A field of /proc/meminfo (MemTotal, MemAvailable, Shmem...) in bytes."""
    return _read_kib_fields("/proc/meminfo")[field]
