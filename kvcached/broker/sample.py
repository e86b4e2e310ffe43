"""One memory sample of the device: what every monitor returns and the policy reads.

A sample says how much memory the device has, how much is free, how much this
process holds and how much everyone else does. It lives apart from the
monitors (monitor.py chooses one, monitor_nvml.py and monitor_host.py take
samples) so that none of them imports another.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

OursFn = Callable[[], int]   # bytes this process's clients hold, as the broker counts them


@dataclass(frozen=True)
class MemorySample:
    total_bytes: int
    free_bytes: int
    ours_bytes: int             # this process
    others_bytes: int           # everyone else (total - free - ours, never below 0)
    pressure: float | None = None   # host: /proc/pressure/memory "some avg10" (%); None where unknown
    monotonic: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "free_bytes": self.free_bytes,
                "ours_bytes": self.ours_bytes, "others_bytes": self.others_bytes,
                "pressure": self.pressure}

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the sample was taken (a monitor that stopped shows here)."""
        return (time.monotonic() if now is None else now) - self.monotonic


def others_from(total: int, free: int, ours: int) -> int:
    return max(0, total - free - ours)
