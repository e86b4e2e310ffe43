"""A request that sets no max_tokens reaches the engines marked open-ended, so the
torch engine books its KV as it grows (engines/torch/serve/kv_budget.py); one that
sets it does not. Every dialect's "no limit" (absent, or -1 in Ollama and llama.cpp)."""
from __future__ import annotations

from dataclasses import replace

from app.server.sampling import UNBOUNDED, make_sampling


def test_no_max_tokens_is_open_ended_and_a_given_one_is_not():
    for absent in (None, -1, -2):
        params = make_sampling(max_tokens=absent)
        assert params.open_ended and params.max_tokens == UNBOUNDED
    for given in (0, 1, 4096, UNBOUNDED):
        params = make_sampling(max_tokens=given)
        assert not params.open_ended and params.max_tokens == given
    # The generation caps max_tokens at the model's context (app/server/generation.py): still open-ended.
    assert replace(make_sampling(max_tokens=None), max_tokens=8192).open_ended
