"""The budget in the settings file bounds every model's memory together, in the real daemon.

The daemon builds one kvcached backend (host, as every daemon of these tests),
one page pool with the settings' budget and the broker over that pool, and
hands the pool to each torch engine it makes (app/daemon.py). So two models'
KV come from one budget: when the second model's request needs pages that the
first model's finished conversation still holds, the broker takes them back
(an admission reclaim from the first model) before the second one maps any.

Real parts: `python -m app.daemon` with a settings file (conftest.start_daemon),
two random-weight SmolLM2-135M models (float32 on the CPU), HTTP requests and
/control/memory read while they run. Sized so the budget binds: the weights of
both models plus one and a half requests' KV (two requests' KV would not fit).
"""
from __future__ import annotations

import pytest

from engines.torch.model.configs import named_config
from memory_watch import MemoryWatch

FIRST, SECOND = "synthetic/smollm2-135m:a", "synthetic/smollm2-135m:b"
CFG = named_config("smollm2-135m")
PAGE = 2 << 20                                   # kvcached's default page
WEIGHTS = CFG.num_params * 4                     # float32 on the CPU, per model
TOKEN_KV = CFG.kv_bytes_per_token(4)             # float32 KV
# The KV comes mostly from the prompt (one prefill step), not from decoding (a step a token).
PROMPT = "budget " * 16                          # 112 tokens: the synthetic vocabulary is bytes
NUM_PREDICT = 4
AHEAD = 16                                       # KvcachedStore maps (and the ledger books) 16 tokens at a time
REQUEST_TOKENS = -(-(len(PROMPT) + 1 + NUM_PREDICT) // AHEAD) * AHEAD
REQUEST_PAGES = -(-REQUEST_TOKENS * TOKEN_KV // PAGE)                     # 3 pages of 2 MiB
KV_ROOM = (3 * REQUEST_PAGES // 2) * PAGE        # one request fits, two do not
BUDGET = 2 * WEIGHTS + KV_ROOM


def settings_toml() -> str:
    models = "".join(f'[models."{name}"]\ncontext_length = 256\n' for name in (FIRST, SECOND))
    # No headroom and no auto-yield: the machine's free RAM never binds, the budget does.
    return (f"synthetic_models = true\nbudget_bytes = {BUDGET}\nheadroom_bytes = 0\nauto_yield = false\n"
            f"keep_alive_s = -1\nnum_slots = 2\n{models}")


def generate(http, model: str) -> dict:
    answer = http.post("/api/generate", json={"model": model, "prompt": PROMPT, "stream": False,
                                              "options": {"num_predict": NUM_PREDICT, "temperature": 0}})
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.timeout(600)
def test_the_settings_budget_bounds_two_models_kv_together(start_daemon, monkeypatch):
    # One torch thread: on this shared 2-core machine two spinning threads took ~5 s a
    # token instead of ~0.2 s (the daemon's environment is copied from ours).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    daemon = start_daemon(settings_toml())
    with daemon.client(timeout=300) as http, MemoryWatch(daemon) as watch:
        assert generate(http, FIRST)["eval_count"] == NUM_PREDICT
        first_held = http.get("/control/memory", headers=daemon.auth).json()["models"][FIRST]["kv_held"]
        assert first_held >= (REQUEST_PAGES - 1) * PAGE     # its finished conversation keeps its pages
        assert generate(http, SECOND)["eval_count"] == NUM_PREDICT
        memory = http.get("/control/memory", headers=daemon.auth).json()
        metrics = http.get("/metrics", headers=daemon.auth).text
    broker = memory["broker"]
    assert memory["backend"] == "host" and broker["budget_bytes"] == BUDGET
    assert sorted(c["name"] for c in broker["clients"]) == [FIRST, SECOND]  # both are the broker's clients
    # The second model's KV came out of the first one's: reclaimed by admission.
    assert memory["models"][FIRST]["kv_held"] < first_held
    assert memory["models"][SECOND]["kv_held"] >= (REQUEST_PAGES - 1) * PAGE
    reclaimed = [line for line in metrics.splitlines()
                 if line.startswith("ebbtide_reclaim_events_total") and f'model="{FIRST}"' in line]
    assert reclaimed, metrics
    # And never, while both ran, did the two models hold more than the budget.
    assert len(watch.samples) > 10
    assert watch.most_held() <= BUDGET
    assert 0 < watch.most_kv() <= KV_ROOM
