"""Reads a live daemon's /control/memory until stopped, for tests that bound what models hold."""
from __future__ import annotations

import threading


class MemoryWatch:
    """Samples /control/memory every `interval_s`; keeps every sample."""

    def __init__(self, daemon, interval_s: float = 0.2) -> None:
        self.daemon = daemon
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with self.daemon.client(timeout=30) as http:
            while not self.stop.wait(self.interval_s):
                self.samples.append(http.get("/control/memory", headers=self.daemon.auth).json())

    def __enter__(self) -> "MemoryWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def most_held(self) -> int:
        """The most every model held together (weights and KV) in any sample."""
        return max(sum(m["weights"] + m["kv_held"] for m in s["models"].values()) for s in self.samples)

    def most_kv(self) -> int:
        return max(sum(m["kv_held"] for m in s["models"].values()) for s in self.samples)
