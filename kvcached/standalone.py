"""A backend and a page pool of their own, for code that builds one engine without the daemon.

The daemon (app/daemon.py) opens one backend and one PagePool for every model
it serves, puts the broker over that pool, and hands the pool to each engine.
Tests and benchmarks that build a TorchEngine directly call standalone_pool()
for the same two objects, owned by the caller: nothing in an engine opens a
backend or a pool by default. Closing the pool closes its backend too.
"""
from __future__ import annotations

from kvcached.config import KvcachedConfig
from kvcached.page_pool import PagePool
from kvcached.vmm import open_backend


class StandalonePool(PagePool):
    """A PagePool that owns its backend: close() closes both."""

    def close(self) -> None:
        super().close()
        self.backend.close()


def standalone_pool(config: KvcachedConfig | None = None) -> StandalonePool:
    """A pool over a backend of its own (config.backend decides which; "auto": cuda where
    a device answers, else host). Its budget, page size and reserve come from config."""
    config = config or KvcachedConfig()
    backend = open_backend(config)
    try:
        return StandalonePool(backend, config)
    except BaseException:
        backend.close()
        raise
