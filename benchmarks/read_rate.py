"""How fast a file reads: from the disk (its pages dropped from the page cache first) and
from the page cache, the figures a model load's read phase is judged against (issue 22:
"report GB/s against the file's size and the disk's read rate").

The pages are dropped with posix_fadvise(DONTNEED) after an fsync, which needs no root but
drops only pages no one else maps: where the "disk" read comes out as fast as the cached
one, the drop did not take, and `dropped` says so.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

CHUNK = 64 << 20
NOT_DROPPED = 0.8   # a "disk" read at this fraction of the cached rate or more: the pages stayed


def drop_cached_pages(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_gb_s(path: Path) -> float:
    """GB/s reading the whole file once, sequentially, in CHUNK reads."""
    buffer = bytearray(CHUNK)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return path.stat().st_size / max(time.perf_counter() - start, 1e-9) / 1e9


def file_read_rates(path: Path) -> dict:
    """{"disk_gb_s", "page_cache_gb_s", "dropped"}; the file is in the page cache after."""
    drop_cached_pages(path)
    disk = read_gb_s(path)
    cached = read_gb_s(path)
    return {"disk_gb_s": disk, "page_cache_gb_s": cached, "dropped": disk < NOT_DROPPED * cached}
