"""An editor's stream of requests to its assistant, through the Ollama API, as Zed or
Continue send them: a short request every couple of seconds.

The kinds a model can answer are read from /api/show: fill-in-the-middle
(`/api/generate` with `suffix`) where its capabilities include "insert", a raw
completion (`/api/generate`, raw) always, and `/api/chat` where it has a chat
template. The stream rotates through them. Each request re-sends the same
file with a different last edit, as an editor does, so prefix reuse is what
it would be in real use. Every record is tagged with the phase it was sent in.
"""
from __future__ import annotations

import asyncio
import logging
import random

import httpx

from benchmarks.load_gen import make_prompt
from benchmarks.stream_client import RequestRecord, ollama_request

log = logging.getLogger(__name__)

FILE_HEAD = '''import os
import sys
from dataclasses import dataclass


@dataclass
class Settings:
    path: str
    retries: int = 3
    verbose: bool = False


def load(path: str) -> Settings:
    """Read the settings file at path."""
    with open(path) as handle:
        lines = [line.strip() for line in handle if line.strip()]
    return Settings(path=path, retries=len(lines))


def main() -> int:
    settings = load(sys.argv[1])
'''
FILE_TAIL = '''
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


async def pick_kinds(client: httpx.AsyncClient, base_url: str, model: str) -> list[str]:
    """Which request kinds this model answers, from /api/show (always at least "generate")."""
    kinds = ["generate"]
    try:
        response = await client.post(f"{base_url}/api/show", json={"model": model})
        response.raise_for_status()
        show = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("/api/show failed for %s (%s): raw completions only", model, exc)
        return kinds
    if "insert" in (show.get("capabilities") or ()):
        kinds.insert(0, "fim")
    if show.get("template"):
        kinds.append("chat")
    return kinds


def request_body(kind: str, model: str, rng: random.Random, num_predict: int) -> dict:
    """One editor request of the given kind; the last edit differs every time."""
    edit = f"    # {make_prompt(rng, 6)}\n    print(settings.{rng.choice(('path', 'retries', 'verbose'))})\n"
    options = {"num_predict": num_predict, "temperature": 0}
    if kind == "fim":
        return {"model": model, "prompt": FILE_HEAD + edit, "suffix": FILE_TAIL, "stream": True,
                "options": options}
    if kind == "chat":
        question = f"What does this code do?\n\n{FILE_HEAD}{edit}"
        return {"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
                "options": options}
    return {"model": model, "prompt": FILE_HEAD + edit, "raw": True, "stream": True, "options": options}


class EditorStream:
    """Sends one request every ~interval_s (+-50%) until stop(); keeps every record."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, model: str, kinds: list[str],
                 interval_s: float, num_predict: int, clock, seed: int = 1) -> None:
        self.client = client
        self.base_url = base_url
        self.model = model
        self.kinds = kinds
        self.interval_s = interval_s
        self.num_predict = num_predict
        self.clock = clock
        self.rng = random.Random(seed)
        self.phase = "before"
        self.records: list[RequestRecord] = []
        self._stopped = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()

    async def _one(self, kind: str, body: dict, phase: str) -> None:
        self.records.append(await ollama_request(self.client, self.base_url, kind, body, self.clock, phase))

    async def run(self) -> None:
        count = 0
        while not self._stopped.is_set():
            kind = self.kinds[count % len(self.kinds)]
            body = request_body(kind, self.model, self.rng, self.num_predict)
            # Requests do not wait for each other: an editor fires as the user types.
            task = asyncio.create_task(self._one(kind, body, self.phase))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            count += 1
            # A steady cadence with jitter, as typing is: every phase gets its share of requests.
            gap = self.interval_s * self.rng.uniform(0.5, 1.5)
            try:
                await asyncio.wait_for(self._stopped.wait(), gap)
            except asyncio.TimeoutError:
                pass
        if self._inflight:
            await asyncio.gather(*self._inflight)

    def stop(self) -> None:
        self._stopped.set()
