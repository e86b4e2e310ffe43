"""The model manager's books on a fake engine factory: keep_alive, leases, the reaper, load failures.

As Ollama's scheduler tests run on `loadFn` fakes, the manager here takes a
factory that makes FakeEngines (load and unload only count and flip a state),
so each rule is checked in milliseconds. Real parts: the ModelManager itself,
its EventHub, the BrokerLink without a broker (as a daemon whose broker could
not start) and the registry's synthetic source (names that need no files).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

import app.models.manager as manager_module
from app.models.events import EventHub
from app.models.manager import ModelManager
from app.settings import ModelSettings, Settings
from engines.base import Engine, ModelInfo
from engines.config import EngineConfig
from engines.errors import ModelLoadError, ModelNotFound
from engines.registry import ModelRegistry
from engines.types import EmbeddingResult, GenerateRequest, LoadProgress, MemoryReport, ModelState, StreamChunk

A, B = "synthetic/smollm2-135m:a", "synthetic/smollm2-135m:b"


class FakeEngine(Engine):
    """An engine whose load and unload only count; busy when told."""
    kind = "fake"

    def __init__(self, info: ModelInfo, fail: Exception | None = None, load_s: float = 0.0) -> None:
        super().__init__(info)
        self._state = ModelState.UNLOADED
        self.fail, self.load_s = fail, load_s
        self.loads = self.unloads = 0
        self.is_busy = False

    def load(self, progress=None) -> None:
        time.sleep(self.load_s)
        if self.fail is not None:
            raise self.fail
        if progress is not None:
            progress(LoadProgress(self.info.name, 1.0, "ready"))
        self.loads += 1
        self._state = ModelState.LOADED

    def unload(self) -> int:
        if self._state is ModelState.UNLOADED:
            return 0
        self.unloads += 1
        self._state = ModelState.UNLOADED
        return 1000

    @property
    def state(self) -> ModelState:
        return self._state

    def generate(self, request: GenerateRequest) -> Iterator[StreamChunk]:
        return iter(())

    def embed(self, texts: list[str]) -> EmbeddingResult:
        return EmbeddingResult((), 0)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(text.encode())

    def detokenize(self, token_ids: list[int]) -> str:
        return bytes(token_ids).decode()

    def memory(self) -> MemoryReport:
        return MemoryReport(weights_bytes=1000 if self._state is not ModelState.UNLOADED else 0)

    def trim(self) -> int:
        return 0

    def drop_prefixes(self) -> int:
        return 0

    def pause(self) -> int:
        self._state = ModelState.PAUSED
        return 500

    def resume(self) -> None:
        self._state = ModelState.LOADED

    @property
    def busy(self) -> bool:
        return self.is_busy

    @property
    def idle_since(self) -> float:
        return time.monotonic()


class Factory:
    """The manager's make_engine: FakeEngines, remembered; fails while `fail` is set."""

    def __init__(self) -> None:
        self.made: list[FakeEngine] = []
        self.fail: Exception | None = None
        self.load_s = 0.0

    def __call__(self, info: ModelInfo) -> FakeEngine:
        engine = FakeEngine(info, self.fail, self.load_s)
        self.made.append(engine)
        return engine


def make_manager(tmp_path, factory: Factory, **settings) -> tuple[ModelManager, list]:
    config = EngineConfig(models_dir=str(tmp_path), include_bundled=False, include_synthetic=True,
                          scan_ollama=False, scan_lmstudio=False, scan_hf_cache=False)
    hub = EventHub()
    events: list = []
    hub.listen(events.append)
    return ModelManager(ModelRegistry(config), factory, Settings(**settings), hub), events


def run(coro):
    return asyncio.run(coro)


def states(events: list, name: str) -> list[str]:
    return [e.data["state"] for e in events if e.kind == "model" and e.data.get("model") == name]


def test_concurrent_leases_load_once_and_share_the_engine(tmp_path):
    factory = Factory()
    factory.load_s = 0.2                      # both leases arrive while the first load runs
    manager, events = make_manager(tmp_path, factory)

    async def main():
        first, second = await asyncio.gather(manager.lease(A), manager.lease(A))
        assert first.engine is second.engine and first.loaded.active == 2
        first.release()
        first.release()                       # idempotent
        assert second.loaded.active == 1
        second.release()
        return first.loaded

    loaded = run(main())
    assert len(factory.made) == 1 and factory.made[0].loads == 1
    assert states(events, A) == ["loading", "loaded"]
    assert any(e.kind == "progress" and e.data["stage"] == "ready" for e in events)
    assert loaded.active == 0 and loaded.expires_at < float("inf")


@pytest.mark.parametrize("user, model_user, requested, expected", [
    (300.0, None, None, 300.0),              # the user's default
    (300.0, None, 10.0, 10.0),               # a client may ask for less
    (300.0, None, 900.0, 300.0),             # never for more
    (300.0, None, -1.0, 300.0),              # "forever" from a client is the user's setting
    (-1.0, None, None, float("inf")),        # the user's "never unload"
    (300.0, 20.0, 60.0, 20.0),               # a per-model setting is the ceiling for that model
])
def test_keep_alive_is_the_clients_wish_capped_by_the_users(tmp_path, user, model_user, requested, expected):
    models = {A: ModelSettings(keep_alive_s=model_user)} if model_user is not None else {}
    manager, _ = make_manager(tmp_path, Factory(), keep_alive_s=user, models=models)
    assert manager.effective_keep_alive(A, requested) == expected


def test_keep_alive_zero_unloads_when_the_last_lease_ends(tmp_path):
    factory = Factory()
    manager, events = make_manager(tmp_path, factory)

    async def main():
        lease = await manager.lease(A, keep_alive_s=0)
        other = await manager.lease(A)
        lease.release()
        await asyncio.sleep(0.05)
        assert manager.find_loaded(A) is not None     # another lease still holds it
        other.release()                               # its keep_alive (300 s) is what counts now
        await asyncio.sleep(0.05)
        assert manager.find_loaded(A) is not None
        last = await manager.lease(A, keep_alive_s=0)
        last.release()
        for _ in range(50):
            await asyncio.sleep(0.02)
            if manager.find_loaded(A) is None:
                return

    run(main())
    assert manager.find_loaded(A) is None and factory.made[0].unloads == 1
    assert states(events, A)[-1] == "unloaded"


def test_expire_while_serving_unloads_once_the_requests_are_done(tmp_path):
    factory = Factory()
    manager, _ = make_manager(tmp_path, factory)

    async def main():
        lease = await manager.lease(A)
        assert await manager.expire(A) == 0           # Ollama's keep_alive 0 mid-request
        assert manager.find_loaded(A) is not None and lease.loaded.unload_when_idle
        lease.release()
        for _ in range(50):
            await asyncio.sleep(0.02)
            if manager.find_loaded(A) is None:
                return

    run(main())
    assert manager.find_loaded(A) is None and factory.made[0].unloads == 1


def test_the_reaper_unloads_expired_idle_models_only(tmp_path, monkeypatch):
    monkeypatch.setattr(manager_module, "REAP_INTERVAL_S", 0.02)
    factory = Factory()
    manager, _ = make_manager(tmp_path, factory, keep_alive_s=0.05)

    async def main():
        manager.start()
        held = await manager.lease(A)                 # leased: never reaped
        busy = await manager.lease(B)
        busy.release()
        factory.made[1].is_busy = True                # expired but still running: not reaped
        idle_b = manager.find_loaded(B)
        await asyncio.sleep(0.3)
        assert manager.find_loaded(A) is not None and manager.find_loaded(B) is idle_b
        factory.made[1].is_busy = False
        held.release()
        for _ in range(50):
            await asyncio.sleep(0.02)
            if not manager.loaded():
                break
        await manager.close()

    run(main())
    assert not manager.loaded() and [e.unloads for e in factory.made] == [1, 1]


def test_a_failed_load_leaves_nothing_loaded_and_the_next_request_tries_again(tmp_path):
    factory = Factory()
    factory.fail = ModelLoadError("the file is damaged")
    manager, events = make_manager(tmp_path, factory)

    async def main():
        with pytest.raises(ModelLoadError, match="damaged"):
            await manager.lease(A)
        assert manager.find_loaded(A) is None
        factory.fail = None
        lease = await manager.lease(A)
        lease.release()

    run(main())
    assert len(factory.made) == 2 and factory.made[1].loads == 1
    assert states(events, A) == ["loading", "unloaded", "loading", "loaded"]


def test_an_unknown_model_is_not_found_and_nothing_is_made(tmp_path):
    factory = Factory()
    manager, _ = make_manager(tmp_path, factory)
    with pytest.raises(ModelNotFound):
        run(manager.lease("synthetic/no-such-config"))
    assert factory.made == []


def test_a_model_the_broker_unloaded_loads_again_on_its_engine(tmp_path):
    factory = Factory()
    manager, events = make_manager(tmp_path, factory)

    async def main():
        (await manager.lease(A)).release()
        factory.made[0].unload()                      # the broker's unload verb, under pressure
        lease = await manager.lease(A)
        lease.release()
        return lease.engine

    engine = run(main())
    assert engine is factory.made[0] and len(factory.made) == 1 and engine.loads == 2
    assert [e.data.get("reason") for e in events if e.kind == "model"][-1] == "reload"


def test_pause_resume_and_unload_verbs_publish_their_states(tmp_path):
    factory = Factory()
    manager, events = make_manager(tmp_path, factory)

    async def main():
        (await manager.lease(A)).release()
        assert await manager.pause(A) == 500
        await manager.resume(A)
        assert await manager.unload(A) == 1000
        with pytest.raises(ModelNotFound):
            await manager.pause(A)

    run(main())
    assert states(events, A)[-3:] == ["paused", "loaded", "unloaded"]
