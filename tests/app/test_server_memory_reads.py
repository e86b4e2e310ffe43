"""Memory reads never stall the event loop.

A model's KV cache lock is held while a pause or resume copies its KV between
device and host (gigabytes on a GPU, hundreds of ms). Every route that reports
memory reads it (/control/memory, /control/models, /api/ps, /metrics): they
wait in the thread pool, and every other request is served meanwhile.

Real parts: the daemon's app (build_context + create_app) under uvicorn on
loopback, a real torch engine (synthetic SmolLM2-135M shape on the CPU, its KV
in kvcached host pages) and the very lock a pause holds; httpx clients.
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from app.daemon import build_context
from app.server.app_factory import create_app
from app.settings import ModelSettings, Settings
from desktop_support import free_port

MODEL = "synthetic/smollm2-135m"
MEMORY_ROUTES = ("/control/memory", "/control/models", "/api/ps", "/metrics")


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("EBBTIDE_HOME", str(tmp_path))
    settings = Settings(port=free_port(), synthetic_models=True, scan_ollama=False, scan_lmstudio=False,
                        scan_hf_cache=False, keep_alive_s=-1, num_slots=2, torch_llamacpp_numerics=False,
                        models={MODEL: ModelSettings(engine="torch", context_length=128)})
    ctx = build_context(settings)
    uv = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=settings.port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    try:
        yield ctx
    finally:
        uv.should_exit = True
        thread.join(30)


@pytest.mark.timeout(240)
def test_memory_reports_wait_off_the_event_loop_while_a_pause_holds_the_cache(server):
    ctx = server
    auth = {"Authorization": f"Bearer {ctx.token}"}
    with httpx.Client(base_url=ctx.endpoint_url, timeout=180, trust_env=False) as http:
        first = http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                 "options": {"num_predict": 1, "temperature": 0}})
        assert first.status_code == 200, first.text
        cache = ctx.manager.find_loaded(MODEL).engine.store.cache
        answers: dict[str, httpx.Response] = {}

        def read(route: str) -> None:
            with httpx.Client(base_url=ctx.endpoint_url, timeout=60, trust_env=False) as own:
                answers[route] = own.get(route, headers=auth)

        with cache._cond:                  # what pause() and resume() hold while they copy
            readers = [threading.Thread(target=read, args=(r,)) for r in MEMORY_ROUTES]
            for t in readers:
                t.start()
            time.sleep(0.5)                # every reader is now waiting for the lock
            assert not answers, f"answered while the cache was locked: {sorted(answers)}"
            started = time.monotonic()
            for route in ("/api/version", "/control/status", "/api/tags"):
                assert http.get(route, headers=auth, timeout=10).status_code == 200
            assert time.monotonic() - started < 5      # served at once, not after the lock
        for t in readers:
            t.join(30)
    assert {r: answers[r].status_code for r in MEMORY_ROUTES} == {r: 200 for r in MEMORY_ROUTES}
    assert answers["/control/memory"].json()["models"][MODEL]["kv_held"] > 0
    assert any(m["name"] == MODEL for m in answers["/api/ps"].json()["models"])
    assert f'model="{MODEL}"' in answers["/metrics"].text
