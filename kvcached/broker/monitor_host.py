"""The host backend's monitor: MemAvailable and memory pressure from /proc.

"Free" is MemAvailable (what the kernel could hand out without swapping);
"ours" is what the broker's clients hold (their mapped pages); everyone else
is MemTotal - MemAvailable - ours. /proc/pressure/memory ("some avg10", the
share of the last 10 s some task stalled on memory) is reported beside it
where the kernel has PSI.
"""
from __future__ import annotations

from pathlib import Path

from kvcached.broker.sample import MemorySample, OursFn, others_from
from kvcached.rss import meminfo_bytes

PSI_PATH = Path("/proc/pressure/memory")


def read_pressure(path: Path = PSI_PATH) -> float | None:
    """'some avg10=1.23 ...' -> 1.23; None without PSI (older kernels, some containers)."""
    try:
        for line in path.read_text().splitlines():
            kind, *fields = line.split()
            if kind == "some":
                values = dict(f.split("=", 1) for f in fields)
                return float(values["avg10"])
    except (OSError, ValueError, KeyError):
        return None
    return None


class HostMonitor:
    name = "host"

    def __init__(self, ours: OursFn) -> None:
        self._ours = ours

    def sample(self) -> MemorySample:
        total = meminfo_bytes("MemTotal")
        free = meminfo_bytes("MemAvailable")
        ours = self._ours()
        return MemorySample(total, free, ours, others_from(total, free, ours), read_pressure())

    def close(self) -> None:
        """Nothing held."""
