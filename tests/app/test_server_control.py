"""The control API the tray and dashboard use, against a live daemon: states, memory, verbs, events."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.client(headers=live_server.auth) as client:
        yield client


def _generate(http, model: str) -> None:
    response = http.post("/api/generate", json={"model": model, "prompt": "Hi", "stream": False,
                                                "options": {"num_predict": 2}})
    assert response.status_code == 200, response.text


def _row(http, model: str) -> dict:
    return {m["name"]: m for m in http.get("/control/models").json()["models"]}[model]


def test_models_memory_and_status(live_server, http) -> None:
    model = live_server.default_model()
    _generate(http, model)
    row = _row(http, model)
    assert row["state"] == "loaded" and row["busy"] is False and row["engine"] == "llamacpp"
    assert row["memory"]["weights"] > 0 and row["memory"]["kv_held"] > 0
    assert {"weights", "kv_held", "kv_live", "paused_host"} <= row["memory"].keys()
    assert isinstance(row["priority"], int)
    memory = http.get("/control/memory").json()
    assert memory["device"]["total_bytes"] > 0 and memory["models"][model]["weights"] > 0
    assert memory["auto_yield"] in (True, False) and memory["headroom_bytes"] >= 0
    # The broker opens in the background (it imports torch); wait for it.
    deadline = time.monotonic() + 90
    while (status := http.get("/control/status").json())["backend"] == "none" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status["endpoint"].startswith("http://127.0.0.1:") and status["backend"] == "host"
    assert status["broker"] is True


def test_pause_resume_reclaim_unload(live_server, http) -> None:
    model = live_server.default_model()
    _generate(http, model)
    paused = http.post(f"/control/models/{model}/pause").json()
    assert paused["state"] == "paused" and paused["bytes_returned"] > 0
    assert _row(http, model)["memory"]["kv_held"] == 0
    _generate(http, model)  # the next request resumes it
    assert _row(http, model)["state"] == "loaded"
    assert http.post(f"/control/models/{model}/pause").status_code == 200
    assert http.post(f"/control/models/{model}/resume").json()["state"] == "loaded"
    assert http.post(f"/control/models/{model}/reclaim").status_code == 200
    # "Free all GPU memory, keep ready": llama.cpp has no weights rung, so the model is paused.
    _generate(http, model)
    away = http.post(f"/control/models/{model}/weights_to_host").json()
    assert away["state"] == "paused" and away["action"] == "weights_to_host"
    assert _row(http, model)["rung"] == "kv_on_host"
    _generate(http, model)
    assert _row(http, model)["rung"] == "loaded"
    unloaded = http.post(f"/control/models/{model}/unload").json()
    assert unloaded["state"] == "unloaded" and unloaded["bytes_returned"] > 0
    assert _row(http, model)["state"] == "unloaded"
    assert http.post(f"/control/models/{model}/pause").status_code == 404  # not loaded
    assert http.post("/control/models/no-such-model/pause").status_code == 404


def test_give_everything_back_and_auto_yield(live_server, http) -> None:
    _generate(http, live_server.default_model())
    assert http.post("/control/reclaim").json()["bytes_returned"] > 0
    assert http.post("/control/auto-yield", json={"enabled": False}).json() == {"auto_yield": False}
    assert http.get("/control/memory").json()["auto_yield"] is False
    assert http.post("/control/auto-yield", json={"enabled": True}).json() == {"auto_yield": True}
    assert http.post("/control/auto-yield", json={"enabled": "maybe"}).status_code == 400   # a bad body is 400 on every route


def test_event_stream_shows_state_changes_and_reclaims(live_server, http) -> None:
    model = live_server.default_model()
    _generate(http, model)
    seen: list[dict] = []
    ready = threading.Event()

    def follow() -> None:
        with httpx.stream("GET", f"{live_server.url}/control/events", headers=live_server.auth,
                          timeout=60, trust_env=False) as response:
            ready.set()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if any(e["kind"] == "model" and e.get("state") == "unloaded" for e in seen):
                        return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    assert ready.wait(30)
    http.post("/control/reclaim")
    http.post(f"/control/models/{model}/unload")
    thread.join(60)
    kinds = {e["kind"] for e in seen}
    assert "model" in kinds and ("broker" in kinds or "reclaim" in kinds)
    assert all(e["seq"] > 0 and e["time"] > 0 for e in seen)
