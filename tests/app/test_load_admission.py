"""Loads admitted like KV (issue 19), in the real daemon on the host backend.

Before a model loads, the broker is asked for what the load will hold (the
engine's `load_estimate`: here float32 weights of a random-weight SmolLM2-135M,
~538 MB), and makes room along its ladder: the idle model's cached KV, then
pausing it, then unloading it. A model that no reclaim could ever make room
for is refused before anything is allocated, with the setting to raise.

Real parts: `python -m app.daemon` with a settings file whose budget holds one
of the two models and not both, HTTP requests, the broker's events as the
dashboard reads them (/control/events), /control/memory while the loads run.
"""
from __future__ import annotations

import json

import httpx
import pytest

from engines.torch.model.configs import named_config
from memory_watch import MemoryWatch

FIRST, SECOND = "synthetic/smollm2-135m:a", "synthetic/smollm2-135m:b"
HUGE = "synthetic/llama-3.1-8b"          # 32 GB as float32: over any budget here
WEIGHTS = named_config("smollm2-135m").num_params * 4
BUDGET = WEIGHTS * 3 // 2                # one model and its KV, never two models


def settings_toml() -> str:
    models = "".join(f'[models."{name}"]\ncontext_length = 256\n' for name in (FIRST, SECOND, HUGE))
    # No headroom and no auto-yield: the machine's free RAM never binds, the budget does.
    return (f"synthetic_models = true\nbudget_bytes = {BUDGET}\nheadroom_bytes = 0\nauto_yield = false\n"
            f"keep_alive_s = -1\nnum_slots = 2\nadmission_timeout_s = 5\n{models}")


def generate(http, model: str) -> httpx.Response:
    return http.post("/api/generate", json={"model": model, "prompt": "admission " * 8, "stream": False,
                                            "options": {"num_predict": 3, "temperature": 0}})


def broker_steps(daemon) -> list[tuple[str, str, int]]:
    """(client, step, bytes) of every broker event so far, in order, from the event stream."""
    steps = []
    with daemon.client(timeout=httpx.Timeout(10, read=2)) as http:
        try:
            with http.stream("GET", "/control/events", headers=daemon.auth) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if "step" in event and "client" in event:
                            steps.append((event["client"], event["step"], int(event.get("bytes_returned", 0))))
        except httpx.ReadTimeout:   # the backlog is read; the stream only waits for news now
            pass
    return steps


@pytest.mark.timeout(600)
def test_a_load_that_does_not_fit_unloads_the_idle_model_and_one_that_never_fits_is_refused(
        start_daemon, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # two spinning torch threads on 2 shared cores crawl
    daemon = start_daemon(settings_toml())
    with daemon.client(timeout=300) as http, MemoryWatch(daemon, interval_s=0.1) as watch:
        assert generate(http, FIRST).status_code == 200
        answer = generate(http, SECOND)               # does not fit beside FIRST: FIRST makes room
        assert answer.status_code == 200, answer.text
        loaded = [m["name"] for m in http.get("/api/ps").json()["models"]]
        assert loaded == [SECOND]

        refused = generate(http, HUGE)
        assert refused.status_code == 507, refused.text
        assert "budget_bytes" in refused.json()["error"] and HUGE in refused.json()["error"]
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == [SECOND]   # nothing taken

        assert generate(http, FIRST).status_code == 200  # and back: SECOND makes room for FIRST
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == [FIRST]
    assert 0 < watch.most_held() <= BUDGET                     # weights plus KV, bounded by the settings' budget

    steps = [(client, step) for client, step, _ in broker_steps(daemon)]
    first = [step for client, step in steps if client == FIRST]
    # The ladder, cheapest first: FIRST's cached KV, then pausing it, then unloading it.
    assert "unload" in first and first.index("unload") > first.index("pause") > first.index("drop_prefixes")
    assert (SECOND, "admit") in steps and (FIRST, "admit") in steps   # each load's room, as the log says
    unloads = [(client, n) for client, step, n in broker_steps(daemon) if step == "unload"]
    assert [client for client, _ in unloads] == [FIRST, SECOND]
    assert all(n >= WEIGHTS for _, n in unloads)        # what came back was the weights, whole
    assert not any(client == HUGE for client, _ in steps)   # the refused load took nothing from anyone
