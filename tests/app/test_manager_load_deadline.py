"""A request waits for its model's load at most load_timeout_s, then gets a temporary
error (HTTP 503, retry); the load goes on, once, and a later request uses it (issue 15:
on the H200 a reload that never finished left every request waiting for good).

Real ModelManager and TorchEngine (a tiny random-weight Llama on the CPU); its load
waits on an event first, standing in for a load held up by a GPU out of memory."""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
from tiny_gguf import TINY  # noqa: E402

from app.models.events import EventHub  # noqa: E402
from app.models.manager import ModelManager  # noqa: E402
from app.server.errors import classify  # noqa: E402
from app.settings import Settings  # noqa: E402
from engines.base import ModelInfo  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.errors import LoadTimeout  # noqa: E402
from engines.torch.engine import TorchEngine  # noqa: E402
from engines.types import ModelState  # noqa: E402
from kvcached.config import KvcachedConfig  # noqa: E402
from kvcached.standalone import standalone_pool  # noqa: E402

INFO = ModelInfo(name="slow", path="", source="synthetic",
                 metadata={"config": TINY.replace(max_context=128)})


class OneModel:
    def get(self, name: str) -> ModelInfo:
        return INFO

    def default(self) -> ModelInfo:
        return INFO


class HeldUpLoad(TorchEngine):
    """A real engine whose load first waits for `go` (counted: it must run once)."""

    go = threading.Event()
    loads = 0

    def load(self, progress=None) -> None:
        if self.state is ModelState.UNLOADED:
            HeldUpLoad.loads += 1
            HeldUpLoad.go.wait(60)
        super().load(progress)


@pytest.mark.timeout(120)
def test_waiting_for_a_load_is_bounded_and_the_load_runs_once():
    config = EngineConfig(torch_num_slots=1, torch_max_context=128, torch_prefill_chunk=64)
    pool = standalone_pool(KvcachedConfig(backend="host", page_size=64 << 10, reserve_pages=0))
    manager = ModelManager(OneModel(), lambda info: HeldUpLoad(info, config, pool),
                           Settings(load_timeout_s=0.3), EventHub())

    async def scenario() -> None:
        for _ in range(2):                          # two requests, each told to retry
            with pytest.raises(LoadTimeout) as info:
                await manager.lease("slow")
            assert classify(info.value)[0] == 503
        HeldUpLoad.go.set()                         # the memory is back: the load ends
        for _ in range(200):                        # a client retrying after each 503
            try:
                lease = await manager.lease("slow")
                break
            except LoadTimeout:
                continue
        assert lease.engine.state is ModelState.LOADED
        lease.release()
        await manager.close()

    try:
        asyncio.run(scenario())
    finally:
        pool.close()
    assert HeldUpLoad.loads == 1                    # one load, however many waited
