"""A KVCache as a broker client: the reclaim verbs over one cache.

Engines implement the verbs themselves (they own weights and prefix caches
too); this adapter is for a bare cache (benchmarks, tests, a cache that an
engine shares): trim is the cache's trim, pause its pause, unload gives back
everything (pause, then the staging buffer is kept for the resume), and there
are no prefixes to drop. Idleness is the time the last step ended.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from kvcached.kv_cache.manager import KVCache


class KVCacheVerbs:
    def __init__(self, kv: KVCache) -> None:
        self.kv = kv
        self._lock = threading.Lock()
        self._running = 0
        self._idle_since = time.monotonic()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """kv.step_guard() that also tracks idleness for the broker."""
        with self._lock:
            self._running += 1
        try:
            with self.kv.step_guard():
                yield
        finally:
            with self._lock:
                self._running -= 1
                self._idle_since = time.monotonic()

    def held_bytes(self) -> int:
        return self.kv.held_bytes()

    def is_busy(self) -> bool:
        with self._lock:
            return self._running > 0

    def idle_since(self) -> float:
        with self._lock:
            return time.monotonic() if self._running else self._idle_since

    def trim(self) -> int:
        return self.kv.trim()

    def drop_prefixes(self) -> int:
        return 0

    def pause(self) -> int:
        return self.kv.pause()

    def unload(self) -> int:
        return self.kv.pause()
