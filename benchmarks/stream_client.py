"""Streaming HTTP clients that time each request: time to first token, tokens, errors.

Every request goes to the real daemon over HTTP (httpx), in the dialects that
editors speak: OpenAI `/v1/completions` (SSE) and Ollama `/api/generate`,
`/api/chat` (NDJSON). Each request becomes one `RequestRecord`; a request
that gets an HTTP error, an error line mid-stream, a broken connection or no
final chunk counts as failed, never silently as fast. The line parsers are
pure and unit-tested; `run_users` drives the closed-loop users of a
`load_gen.Ramp`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field

import httpx

from benchmarks.load_gen import Ramp

log = logging.getLogger(__name__)

SSE_DONE = "[DONE]"
# Long waits are what the static split produces: never time a request out before the run does.
TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=30.0, pool=None)
LIMITS = httpx.Limits(max_connections=1024, max_keepalive_connections=256)


@dataclass
class RequestRecord:
    model: str
    kind: str                       # "completion", "generate", "chat", "fim"
    t_send: float                   # seconds since the run's origin
    t_first: float | None = None    # first generated text
    t_end: float | None = None
    num_tokens: int = 0             # generated tokens (the server's count where it gives one)
    error: str | None = None
    tag: str = ""                   # phase label ("before", "during", "prefill"...)

    @property
    def ok(self) -> bool:
        return self.error is None and self.t_end is not None and self.t_first is not None

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    def as_dict(self) -> dict:
        return asdict(self)


# --- pure line parsing ---------------------------------------------------------------

@dataclass
class StreamState:
    """What the lines of one stream said so far."""
    text_chunks: int = 0
    num_tokens: int | None = None   # the server's own count, from the final chunk
    done: bool = False
    error: str | None = None
    saw_text: bool = False          # set on the line that carried the first text


def parse_sse_line(line: str) -> dict | str | None:
    """One SSE line: its JSON payload, the string "[DONE]", or None for other lines."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == SSE_DONE:
        return SSE_DONE
    return json.loads(data) if data else None


def feed_openai(state: StreamState, payload: dict | str | None) -> None:
    """Fold one OpenAI completions SSE payload into state."""
    state.saw_text = False
    if payload is None:
        return
    if payload == SSE_DONE:
        state.done = True
        return
    if "error" in payload:
        state.error = json.dumps(payload["error"])[:500]
        return
    for choice in payload.get("choices") or ():
        text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        if text:
            state.text_chunks += 1
            state.saw_text = True
    usage = payload.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        state.num_tokens = int(usage["completion_tokens"])


def feed_ollama(state: StreamState, line: str) -> None:
    """Fold one Ollama NDJSON line (/api/generate or /api/chat) into state."""
    state.saw_text = False
    if not line.strip():
        return
    payload = json.loads(line)
    if "error" in payload:
        state.error = str(payload["error"])[:500]
        return
    text = payload.get("response") or (payload.get("message") or {}).get("content") or ""
    if text:
        state.text_chunks += 1
        state.saw_text = True
    if payload.get("done"):
        state.done = True
        if payload.get("eval_count") is not None:
            state.num_tokens = int(payload["eval_count"])


# A stream whose tokens rendered no text (a random-weight model's special or partial-byte
# tokens): callers that time the response's end instead compare the error to this.
TEXTLESS = "tokens were counted but no text arrived"


def finish(record: RequestRecord, state: StreamState, now: float) -> RequestRecord:
    record.t_end = now
    record.num_tokens = state.num_tokens if state.num_tokens is not None else state.text_chunks
    if state.error is not None:
        record.error = state.error
    elif not state.done:
        record.error = "the stream ended without its final chunk"
    elif record.t_first is None and record.num_tokens > 0:
        record.error = TEXTLESS
    elif record.t_first is None:
        record.t_first = now  # nothing generated (an immediate stop): first "token" is the end
    return record


# --- one request ---------------------------------------------------------------------

Clock = Callable[[], float]


async def _stream(client: httpx.AsyncClient, url: str, body: dict, record: RequestRecord,
                  clock: Clock, is_sse: bool, headers: dict | None = None) -> RequestRecord:
    state = StreamState()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code >= 400:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:300]}"
                record.t_end = clock()
                return record
            async for line in response.aiter_lines():
                if is_sse:
                    feed_openai(state, parse_sse_line(line))
                else:
                    feed_ollama(state, line)
                if state.saw_text and record.t_first is None:
                    record.t_first = clock()
                if state.error is not None:
                    break
    except Exception as exc:  # noqa: BLE001 - any failure is this request's outcome, never the run's
        record.error = f"{type(exc).__name__}: {exc}"[:300]
        record.t_end = clock()
        return record
    return finish(record, state, clock())


async def openai_completion(client: httpx.AsyncClient, base_url: str, model: str, prompt: str,
                            max_tokens: int, clock: Clock, tag: str = "") -> RequestRecord:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}}
    record = RequestRecord(model, "completion", clock(), tag=tag)
    return await _stream(client, f"{base_url}/v1/completions", body, record, clock, True)


async def ollama_request(client: httpx.AsyncClient, base_url: str, kind: str, body: dict,
                         clock: Clock, tag: str = "") -> RequestRecord:
    """kind "chat" posts to /api/chat, anything else ("generate", "fim") to /api/generate."""
    path = "/api/chat" if kind == "chat" else "/api/generate"
    record = RequestRecord(str(body.get("model", "")), kind, clock(), tag=tag)
    return await _stream(client, base_url + path, body, record, clock, False)


# --- closed-loop users ---------------------------------------------------------------

RequestFn = Callable[[random.Random], Awaitable[RequestRecord]]


async def run_user(ramp: Ramp, user: int, send: RequestFn, clock: Clock, think_mean_s: float,
                   seed: int, out: list[RequestRecord]) -> None:
    """One user: inside its window, send, wait for the answer, think, repeat."""
    rng = random.Random(seed)
    on, off = ramp.window(user)
    # Users of the same step would otherwise fire in lockstep: spread them a little.
    start = on + rng.uniform(0, min(think_mean_s, max(off - on, 0.0)))
    await asyncio.sleep(max(0.0, start - clock()))
    while clock() < off:
        out.append(await send(rng))
        pause = rng.expovariate(1.0 / think_mean_s) if think_mean_s > 0 else 0.0
        if clock() + pause >= off:
            break
        await asyncio.sleep(pause)


async def run_users(ramps: Iterable[tuple[Ramp, RequestFn]], clock: Clock, think_mean_s: float,
                    seed: int) -> list[RequestRecord]:
    """Every user of every ramp, concurrently, until the last window closes."""
    records: list[RequestRecord] = []
    tasks = []
    for m, (ramp, send) in enumerate(ramps):
        for u in range(ramp.peak_users):
            tasks.append(run_user(ramp, u, send, clock, think_mean_s, seed * 100_003 + m * 1009 + u,
                                  records))
    await asyncio.gather(*tasks)
    return records


def make_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS)


def origin_clock() -> Clock:
    """Seconds since now, on the monotonic clock."""
    t0 = time.monotonic()
    return lambda: time.monotonic() - t0


@dataclass
class Phase:
    """A named span of a run, for summarising records by when they were sent."""
    name: str
    start: float
    end: float = float("inf")
    notes: dict = field(default_factory=dict)

    def contains(self, t: float) -> bool:
        return self.start <= t < self.end
