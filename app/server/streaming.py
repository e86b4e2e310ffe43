"""Streaming: an engine's blocking token iterator bridged onto the event loop, and
the two wire framings (SSE for OpenAI and llama.cpp, NDJSON for Ollama).

Why a thread per generation: Engine.generate() is a blocking iterator (llama.cpp
and torch steps hold the GIL-releasing native code); running each on its own
thread keeps the event loop free for the other 31 streams. Chunks cross to the
loop with call_soon_threadsafe, the cheapest wake-up asyncio has (~10 us).
A client that goes away cancels the request at once (request.cancel()), so the
engine frees its sequence instead of generating for nobody.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from engines.types import GenerateRequest, StreamChunk

log = logging.getLogger(__name__)

_END = object()


class ChunkBridge:
    """Runs one blocking chunk iterator on a daemon thread; iterate it with `async for`.
    `start` makes the iterator on that thread too: engines tokenize and queue the request
    there, which must not stall the event loop."""

    def __init__(self, start: Callable[[], Iterator[StreamChunk]], request: GenerateRequest) -> None:
        self._start = start
        self._request = request
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, name=f"gen-{request.request_id[:8]}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        put = self._queue.put_nowait
        call = self._loop.call_soon_threadsafe
        try:
            for chunk in self._start():
                call(put, chunk)
        except BaseException as exc:  # handed to the loop, raised where the stream is read
            call(put, exc)
        finally:
            try:
                call(put, _END)
            except RuntimeError:  # the loop closed during shutdown: nobody is reading
                pass

    async def next(self) -> StreamChunk | None:
        """The next chunk, None at the end; re-raises what the engine raised."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._request.cancel()

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        while (chunk := await self.next()) is not None:
            yield chunk


def sse(payload: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def sse_event(event: str, payload: dict, event_id: int | None = None) -> bytes:
    """A named server-sent event (the control API's event stream); with an id, a browser's
    EventSource reconnects with Last-Event-ID and misses nothing still in the history."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def ndjson(payload: dict) -> bytes:
    """One newline-delimited JSON line (Ollama's streaming framing)."""
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


SSE_MEDIA = "text/event-stream"
NDJSON_MEDIA = "application/x-ndjson"
# Proxies and some clients buffer streams unless told not to.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error_frame(exc: BaseException, dialect) -> bytes:
    from app.server.errors import Dialect, stream_error_line

    line = stream_error_line(exc, dialect).decode()
    # llama.cpp's server names the SSE field "error"; OpenAI clients read errors from data lines.
    frames = {Dialect.OPENAI: lambda: f"data: {line}\n\n", Dialect.OLLAMA: lambda: line + "\n",
              Dialect.LLAMACPP: lambda: f"error: {line}\n\n"}
    return frames[dialect]().encode()


async def guarded(frames: AsyncIterator[bytes], close, dialect) -> AsyncIterator[bytes]:
    """Frames of a stream already answered 200: an error midway becomes the dialect's error
    frame (the status cannot change any more); a client that leaves cancels the generation."""
    try:
        async for frame in frames:
            yield frame
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # mid-stream: tell the client in-band, as Ollama and llama.cpp do
        log.warning("stream failed midway: %s", exc)
        yield _error_frame(exc, dialect)
    finally:
        close()
