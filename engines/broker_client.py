"""An engine as a broker client: the small adapter between engines and kvcached's broker.

Each loaded model registers with the broker under its name, with the priority,
pinned minimum and maximum from its settings; the broker then calls the
engine's verbs from its own thread (every engine's verbs are thread-safe).
held_bytes is what the model keeps resident, weights plus KV held, plus KV
promised to admitted sequences and not mapped yet (so the broker never promises
it to another model): the bytes the broker can win back by pausing (KV),
moving the weights to host memory too, or unloading (both). cached_bytes
is what trim + drop_prefixes can give.
`load_estimate` is what a load will take, for Broker.admit before loading,
read from the model's metadata without loading it.
"""
from __future__ import annotations

from kvcached.broker import Broker, ClientHandle, ClientSpec

from engines.base import Engine, ModelInfo

F16_BYTES = 2


class EngineVerbs:
    """kvcached.broker.ReclaimVerbs over an Engine. While a load admitted by the broker
    runs (`loading`), the model counts what the load will hold (its estimate) or what it
    holds so far, whichever is more, the part not allocated yet as booked, and it is
    busy: nothing reclaims from a model halfway through its load."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loading_bytes = 0

    def held_bytes(self) -> int:
        report = self.engine.memory()
        held = report.weights_bytes + report.kv_held_bytes
        return max(held, self.loading_bytes) + report.kv_booked_bytes

    def cached_bytes(self) -> int | None:
        return self.engine.memory().kv_cached_bytes

    def booked_bytes(self) -> int:
        report = self.engine.memory()
        not_yet = max(0, self.loading_bytes - report.weights_bytes - report.kv_held_bytes)
        return report.kv_booked_bytes + not_yet

    def is_busy(self) -> bool:
        return self.engine.busy or self.loading_bytes > 0

    def idle_since(self) -> float:
        return self.engine.idle_since

    def trim(self) -> int:
        return self.engine.trim()

    def drop_prefixes(self) -> int:
        return self.engine.drop_prefixes()

    def pause(self) -> int:
        return self.engine.pause()

    def weights_to_host(self) -> int:
        return self.engine.weights_to_host()

    def relieve_host(self) -> int:
        return self.engine.relieve_host()

    def unload(self) -> int:
        return self.engine.unload()


def register_engine(broker: Broker, engine: Engine, priority: int = 0, min_bytes: int = 0,
                    max_bytes: int | None = None, verbs: EngineVerbs | None = None) -> ClientHandle:
    """Register engine with the broker: the one way an engine becomes a broker client
    (the daemon's BrokerLink comes here too, with verbs that also announce). Keep the
    handle, and unregister() it when the model is removed. Raises kvcached ConfigError
    when the name is taken."""
    spec = ClientSpec(name=engine.info.name, priority=priority, min_bytes=min_bytes, max_bytes=max_bytes)
    handle = broker.register(spec, verbs if verbs is not None else EngineVerbs(engine))
    engine.attach_broker(handle)   # from now on its sequences are admitted against the budget
    return handle


def unregister_engine(handle: ClientHandle, engine: Engine) -> None:
    """The reverse of register_engine: admission stops, the broker forgets it."""
    engine.attach_broker(None)
    handle.unregister()


def admitted_load(handle: ClientHandle, verbs: EngineVerbs, progress=None) -> None:
    """Load verbs.engine once the broker made room for what the load will hold
    (Broker.admit with load=True: pause, then unload, idle models of no higher priority;
    AdmissionDenied when what is in the way is busy, DoesNotFit when nothing could make
    room). The booking ends when the load does: from then on the model counts what it holds."""
    engine = verbs.engine
    estimate = engine.load_estimate()

    def book(nbytes: int) -> None:
        verbs.loading_bytes = nbytes
    try:
        handle.broker.admit(handle, estimate, commit=book, load=True)
        engine.load(progress)
    finally:
        verbs.loading_bytes = 0


def load_estimate(info: ModelInfo, n_ctx: int) -> int:
    """Bytes a load will hold: the file's weights plus an f16 KV cache of n_ctx tokens."""
    meta = info.metadata
    n_layer = int(meta.get("block_count") or 0)
    n_head = max(1, int(meta.get("head_count") or 1))
    n_head_kv = int(meta.get("head_count_kv") or n_head)
    head_dim = int(meta.get("embedding_length") or 0) // n_head
    kv_per_token = n_layer * 2 * n_head_kv * head_dim * F16_BYTES
    return info.size_bytes + n_ctx * kv_per_token
