"""The streaming pieces on their own: wire framing, in-band errors once a stream has started,
the thread-to-loop bridge and its cancellation, the event hub, the metrics text."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest

from app.server.errors import Dialect
from app.models.events import EventHub
from app.server.metrics import Metrics
from app.server.streaming import ChunkBridge, guarded, ndjson, sse, sse_event
from engines.errors import EngineBusy
from engines.types import GenerateRequest, RequestKind, StreamChunk


def test_framings() -> None:
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert ndjson({"a": 1}) == b'{"a":1}\n'
    assert sse_event("model", {"a": 1}, 7) == b'id: 7\nevent: model\ndata: {"a":1}\n\n'


async def _frames_then_fail():
    yield b"first\n"
    raise EngineBusy("the queue is full")


@pytest.mark.parametrize("dialect, expected", [
    (Dialect.OLLAMA, b'{"error": "the queue is full"}\n'),
    (Dialect.OPENAI, b'data: {"error": {"message": "the queue is full", "type": "unavailable_error", '
                     b'"param": null, "code": 503}}\n\n'),
    (Dialect.LLAMACPP, b'error: {"error": {"code": 503, "message": "the queue is full", '
                       b'"type": "unavailable_error"}}\n\n'),
])
def test_an_error_mid_stream_is_an_in_band_error_frame(dialect, expected) -> None:
    closed = []

    async def collect():
        return [frame async for frame in guarded(_frames_then_fail(), lambda: closed.append(True), dialect)]

    frames = asyncio.run(collect())
    assert frames == [b"first\n", expected]
    assert closed == [True]


def test_bridge_moves_chunks_across_and_reraises_engine_errors() -> None:
    def chunks():
        yield StreamChunk(text="a")
        yield StreamChunk(text="b")
        raise EngineBusy("full")

    async def run():
        bridge = ChunkBridge(chunks, GenerateRequest(RequestKind.COMPLETION))
        got = [await bridge.next(), await bridge.next()]
        with pytest.raises(EngineBusy):
            await bridge.next()
        return got

    assert [c.text for c in asyncio.run(run())] == ["a", "b"]


def test_bridge_cancel_reaches_the_generating_thread() -> None:
    request = GenerateRequest(RequestKind.COMPLETION)
    stopped = threading.Event()

    def endless():
        while not request.cancelled.is_set():
            yield StreamChunk(text="x")
        stopped.set()

    async def run():
        bridge = ChunkBridge(endless, request)
        await bridge.next()
        bridge.cancel()  # what a disconnect does
        while await bridge.next() is not None:
            pass

    asyncio.run(run())
    assert stopped.wait(5)


def test_event_hub_replays_and_follows() -> None:
    hub = EventHub()
    hub.publish("model", model="m", state="loaded")
    seen = []
    hub.listen(seen.append)

    async def run():
        sub = hub.subscribe()
        threading.Thread(target=lambda: hub.publish("progress", model="m", fraction=0.5)).start()
        event = await asyncio.wait_for(sub.queue.get(), 5)
        hub.unsubscribe(sub)
        return event

    event = asyncio.run(run())
    assert event.kind == "progress" and event.to_dict()["fraction"] == 0.5
    assert [e.kind for e in hub.recent()] == ["model", "progress"]
    assert [e.seq for e in hub.recent()] == [1, 2] and seen[0].kind == "progress"


def test_metrics_text_format() -> None:
    metrics = Metrics(lambda: {"m": {"weights": 10, "kv_held": 2}})
    metrics.record_generation("m", 5, 7, 0.02)
    metrics.record_reclaim("pause", "m", 4096)
    text = metrics.render()
    assert 'ebbtide_completion_tokens_total{model="m"} 7' in text
    assert 'ebbtide_time_to_first_token_seconds_bucket{model="m",le="0.025"} 1' in text
    assert 'ebbtide_time_to_first_token_seconds_count{model="m"} 1' in text
    assert 'ebbtide_reclaimed_bytes_total{step="pause",model="m"} 4096' in text
    assert 'ebbtide_model_memory_bytes{model="m",kind="weights"} 10' in text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    json.dumps(text)
