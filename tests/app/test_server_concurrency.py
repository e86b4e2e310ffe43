"""Many clients at once: 32 concurrent streams all complete; a client that leaves mid-stream
frees its place at once."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx

NUM_CLIENTS = 32


async def _stream_one(client: httpx.AsyncClient, model: str, i: int) -> str:
    body = {"model": model, "prompt": f"{i},", "max_tokens": 3, "temperature": 0, "stream": True}
    text, done = "", False
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert done
    return text


def test_32_concurrent_streams_all_complete(live_server) -> None:
    model = live_server.default_model()

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(base_url=live_server.url, timeout=300, limits=limits,
                                     trust_env=False) as client:
            return await asyncio.gather(*(_stream_one(client, model, i) for i in range(NUM_CLIENTS)))

    texts = asyncio.run(run())
    assert len(texts) == NUM_CLIENTS and all(texts)


async def _timed_stream(client: httpx.AsyncClient, model: str, i: int) -> tuple[float, float, int]:
    """(time of the first token, time of the end, tokens) of one streamed completion."""
    body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": 24,
            "temperature": 0, "stream": True}
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                first = first or time.monotonic()
                tokens += 1
    return first, time.monotonic(), tokens


def test_8_concurrent_streams_overlap(live_server) -> None:
    """Issue 21: on the llama.cpp engine, 8 requests at once decode together: every one has
    its first token before any of them has finished (not one after another)."""
    model = live_server.default_model()
    with live_server.client() as http:   # loaded first, so no request waits for the load
        assert http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}).status_code == 200

    async def run() -> list[tuple[float, float, int]]:
        async with httpx.AsyncClient(base_url=live_server.url, timeout=300, trust_env=False,
                                     limits=httpx.Limits(max_connections=8)) as client:
            return await asyncio.gather(*(_timed_stream(client, model, i) for i in range(8)))

    results = asyncio.run(run())
    firsts, ends = [r[0] for r in results], [r[1] for r in results]
    assert all(r[2] > 1 for r in results)
    assert max(firsts) < min(ends), f"first tokens {sorted(firsts)} vs ends {sorted(ends)}"


def test_client_that_disconnects_mid_stream_is_cancelled(live_server) -> None:
    model = live_server.default_model()
    # A generation that would run for minutes on this CPU; the client reads two chunks and leaves.
    body = {"model": model, "prompt": "Count to one thousand:",
            "options": {"num_predict": 4000, "temperature": 0, "seed": 1}}
    with live_server.client() as http:
        with http.stream("POST", "/api/generate", json=body) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines))["done"] is False
            next(lines)
        # The engine noticed and stopped: the model goes idle long before 2000 tokens.
        deadline = time.monotonic() + 20
        auth = live_server.auth
        while time.monotonic() < deadline:
            rows = {m["name"]: m for m in http.get("/control/models", headers=auth).json()["models"]}
            if not rows[model]["busy"]:
                break
            time.sleep(0.05)
        assert not rows[model]["busy"]
        text = http.get("/metrics").text
    completion = [l for l in text.splitlines() if l.startswith("ebbtide_completion_tokens_total")]
    assert completion  # the cancelled request was still counted


def test_client_that_hangs_up_on_a_non_streamed_request_is_cancelled(live_server) -> None:
    # llama.vscode and Zed drop an autocomplete request on the next keystroke (stream: false).
    model = live_server.default_model()
    body = {"prompt": "Count to one thousand:", "n_predict": 4000, "ignore_eos": True}
    with live_server.client() as http:  # loaded first, so the hang-up lands mid-generation
        assert http.post("/completion", json={"prompt": "Hi", "n_predict": 1}).status_code == 200
    with live_server.client(timeout=1.0) as http:
        try:
            http.post("/completion", json=body)
        except httpx.TimeoutException:
            pass  # the client gave up and closed the connection
    with live_server.client() as http:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = {m["name"]: m for m in http.get("/control/models", headers=live_server.auth).json()["models"]}
            if not rows[model]["busy"]:
                break
            time.sleep(0.05)
        assert not rows[model]["busy"]


def test_a_full_queue_answers_busy_with_retry_after(start_daemon) -> None:
    daemon = start_daemon("max_queue = 1\nnum_slots = 1\n")
    long = {"prompt": "Count to one thousand:", "n_predict": 2000, "ignore_eos": True, "stream": True}
    with daemon.client() as first_client, daemon.client() as http:
        with first_client.stream("POST", "/completion", json=long) as running:
            next(running.iter_lines())  # the first request is generating
            # The second waits in the queue; its response would start only after the first.
            second = threading.Thread(target=_post_quietly, args=(daemon, long), daemon=True)
            second.start()
            deadline = time.monotonic() + 30
            busy = None
            while time.monotonic() < deadline:
                try:
                    busy = http.post("/completion", json={"prompt": "Hi", "n_predict": 1}, timeout=2)
                except httpx.TimeoutException:
                    continue  # this one got the queue's place before the second: try again
                if busy.status_code == 503:
                    break
            assert busy.status_code == 503, busy.text
            assert busy.headers["retry-after"] == "1"
            assert "waiting" in busy.json()["error"]["message"]


def _post_quietly(daemon, body: dict) -> None:
    try:
        with daemon.client(timeout=5) as client:
            client.post("/completion", json=body)
    except httpx.HTTPError:
        pass  # it gives up while queued: the daemon cancels it
