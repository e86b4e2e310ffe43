"""One generation as the routes see it: lease the model, start the engine, stream, finish.

All three dialects go through here, so loading, keep_alive, cancellation on
disconnect and metrics are done once. The first chunk is awaited before a
route answers, so errors the engine finds up front (context overflow, no FIM
tokens, busy) become proper HTTP errors instead of a broken stream.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from anyio import to_thread
from starlette.requests import Request

from app.models.manager import Lease, ModelManager
from app.server.errors import BadRequest
from app.server.metrics import Metrics
from app.server.streaming import ChunkBridge
from engines.types import FinishReason, GenerateRequest, StreamChunk, Usage


@dataclass
class Totals:
    """What the routes report at the end: text so far, finish reason, usage, timings."""
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    completion_tokens: int = 0
    first_token_ns: int | None = None
    logprobs: list = field(default_factory=list)   # engines.types.TokenLogprob, where asked for


class Generation:
    def __init__(self, lease: Lease, request: GenerateRequest, metrics: Metrics) -> None:
        self.lease = lease
        self.request = request
        self.metrics = metrics
        self.totals = Totals()
        self.started_ns = time.perf_counter_ns()
        self._bridge: ChunkBridge | None = None
        self._first: StreamChunk | None = None
        self._closed = False

    @property
    def model(self) -> str:
        return self.lease.loaded.name

    @property
    def logprobs(self) -> list:
        return self.totals.logprobs

    @property
    def load_ns(self) -> int:
        return self.lease.load_ns

    async def _start(self) -> None:
        self.lease.track(self.request)
        cap = self.lease.loaded.info.context_length
        if cap and self.request.sampling.max_tokens > cap:  # "until the context is full"
            self.request.sampling = replace(self.request.sampling, max_tokens=cap)
        engine = self.lease.engine
        self._bridge = ChunkBridge(lambda: engine.generate(self.request), self.request)
        self._first = await self._bridge.next()

    def _account(self, chunk: StreamChunk) -> None:
        totals = self.totals
        if chunk.text or chunk.token_ids:
            if totals.first_token_ns is None:
                totals.first_token_ns = time.perf_counter_ns() - self.started_ns
            totals.text += chunk.text
            totals.completion_tokens += len(chunk.token_ids) or 1
        totals.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            totals.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            totals.usage = chunk.usage

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """Every chunk, the prefetched first one included. Closes the generation when done."""
        try:
            chunk = self._first
            while chunk is not None:
                self._account(chunk)
                yield chunk
                chunk = await self._bridge.next()
        finally:
            self.close()

    async def collect(self, client: Request | None = None, stop_after=None) -> Totals:
        """The whole generation (stream: false). With the client's request, a client that
        hangs up (an editor's autocomplete after the next keystroke) cancels it at once.
        stop_after(chunk) -> True ends it early: the engine is told to stop, and the
        finish reason stays what the caller sets."""
        watcher = asyncio.create_task(_cancel_on_disconnect(client, self.request)) if client else None
        try:
            async for chunk in self.chunks():
                if stop_after is not None and stop_after(chunk):
                    self.request.cancel()
                    break
        finally:
            if watcher is not None:
                watcher.cancel()
        return self.totals

    def close(self) -> None:
        """Ends the generation: cancels it if unfinished (client gone), releases the model."""
        if self._closed:
            return
        self._closed = True
        if self.totals.finish_reason is None:
            self.request.cancel()  # the client went away or the stream failed: free the sequence now
        self.lease.release()
        usage = self.totals.usage or Usage(completion_tokens=self.totals.completion_tokens)
        ttft = None if self.totals.first_token_ns is None else self.totals.first_token_ns / 1e9
        self.metrics.record_generation(self.model, usage.prompt_tokens, usage.completion_tokens, ttft)

    def usage(self) -> Usage:
        return self.totals.usage or Usage(completion_tokens=self.totals.completion_tokens)


async def _cancel_on_disconnect(client: Request, request: GenerateRequest) -> None:
    # The body is read already, so the next ASGI message can only be the client leaving.
    while (await client.receive())["type"] != "http.disconnect":
        pass
    request.cancel()


async def start_generation(manager: ModelManager, metrics: Metrics, model: str | None,
                           request: GenerateRequest, keep_alive_s: float | None = None) -> Generation:
    """Lease the model (loading it if needed) and start generating; errors raise here."""
    lease = await manager.lease(model, keep_alive_s)
    generation = Generation(lease, request, metrics)
    try:
        await generation._start()
    except BaseException:
        generation.close()
        raise
    return generation


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Token ids from clients reach native code: out-of-range ids must never get there."""
    bad = [t for t in ids if t < 0 or (vocab_size and t >= vocab_size)]
    if bad:
        raise BadRequest(f"tokens: ids outside the vocabulary (0..{vocab_size - 1}): {bad[:5]}")


async def detokenize(manager: ModelManager, model: str | None, ids: list[int]) -> str:
    lease = await manager.lease(model)
    try:
        check_token_ids(ids, int(lease.loaded.info.metadata.get("vocab_size") or 0))
        return await to_thread.run_sync(lease.engine.detokenize, ids)
    finally:
        lease.release()
