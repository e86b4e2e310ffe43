"""The video call's stand-in on the host: its sizes, its retry loop and its line protocol.

desktop_pressure.py drives benchmarks/video_call.py over stdin/stdout and judges
the broker by the waits it reports, so the protocol and the waits must be right.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.video_call import AllocationFailed, allocate_with_retry, parse_size

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "video_call.py"


def test_sizes_parse() -> None:
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("1.5g") == 3 << 29
    assert parse_size("4096") == 4096
    for bad in ("", "GiB", "12 parsecs", "-"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


class FlakyAllocator:
    """Fails the first `failures` attempts, as a full device does until memory comes back."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def allocate(self, nbytes: int) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise AllocationFailed("out of memory")

    def free_bytes(self) -> int:
        return 0


def test_failed_allocations_are_retried_and_timed() -> None:
    step = allocate_with_retry(FlakyAllocator(3), 1 << 20, retry_s=0.001, give_up_s=5.0)
    assert step is not None and step.attempts == 4 and step.wait_s > 0
    assert allocate_with_retry(FlakyAllocator(10**9), 1 << 20, retry_s=0.001, give_up_s=0.02) is None


def test_host_call_speaks_its_protocol() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", "host", "--grow", "8MiB", "--step", "3MiB",
         "--hold-s", "0", "--no-wait"], capture_output=True, text=True, timeout=60, check=True)
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["READY", "GROWN", "RELEASED"]
    result = json.loads(lines[3].removeprefix("RESULT "))
    assert [s["nbytes"] for s in result["steps"]] == [3 << 20, 3 << 20, 2 << 20]
    assert result["failed_steps"] == 0 and result["t_released"] >= result["t_grown"]
