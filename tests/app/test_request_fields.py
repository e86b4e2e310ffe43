"""The README's field table (app/server/fields.py FIELDS), walked against the live daemon:
no request field is silently dropped. Each field the table refuses answers 400 naming it; each
field it ignores (as the reference server does) is accepted; each field it honours is a field of
the route's body model that route code reads; a field in no table answers 400 naming it."""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from app.server import llamacpp_routes, ollama_routes, openai_chat, openai_routes
from app.server.fields import FIELDS, OLLAMA_OPTIONS, markdown_table

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "app" / "server"
MODELS = {
    "POST /v1/chat/completions": openai_chat.ChatCompletionBody,
    "POST /v1/completions": openai_routes.CompletionBody,
    "POST /v1/embeddings": openai_routes.EmbeddingBody,
    "POST /api/chat": ollama_routes.ChatBody,
    "POST /api/generate": ollama_routes.GenerateBody,
    "POST /api/embed": ollama_routes.EmbedBody,
    "POST /completion": llamacpp_routes.CompletionBody,
    "POST /infill": llamacpp_routes.InfillBody,
}
CHAT = [{"role": "user", "content": "hi"}]


def minimal(endpoint: str, model: str) -> dict:
    bodies = {
        "POST /v1/chat/completions": {"model": model, "messages": CHAT, "max_tokens": 1},
        "POST /v1/completions": {"model": model, "prompt": "hi", "max_tokens": 1},
        "POST /v1/embeddings": {"model": model, "input": "hi"},
        "POST /api/chat": {"model": model, "messages": CHAT, "stream": False, "options": {"num_predict": 1}},
        "POST /api/generate": {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
        "POST /api/embed": {"model": model, "input": "hi"},
        "POST /completion": {"prompt": "hi", "n_predict": 1},
        "POST /infill": {"input_prefix": "def f(", "input_suffix": ")", "n_predict": 0},   # warm-up: no FIM needed
    }
    return bodies[endpoint]


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.client(timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def model(live_server) -> str:
    return live_server.default_model()


def _post(http: httpx.Client, endpoint: str, body: dict) -> httpx.Response:
    return http.post(endpoint.split(" ", 1)[1], json=body)


def _code() -> str:
    """Route code without the body models' declarations (a declared field must also be read)."""
    text = "".join(p.read_text() for p in SERVER.glob("*.py") if p.name != "fields.py")
    return re.sub(r"^    \w+: .*= (Field\(.*\)|None|False|True|\"\"|-?\d+)$", "", text, flags=re.M)


def test_every_table_covers_its_model_and_back() -> None:
    for endpoint, model_cls in MODELS.items():
        declared = set(model_cls.model_fields)
        table = FIELDS[endpoint]
        assert declared - set(table) == set(), f"{endpoint}: fields parsed but not in the table"
        honoured = {k for k, (status, _) in table.items() if status == "honoured"}
        assert honoured - declared == set(), f"{endpoint}: honoured in the table, unknown to the model"


def test_every_honoured_field_is_read_by_route_code() -> None:
    code = _code()
    for endpoint, table in FIELDS.items():
        for name, (status, _) in table.items():
            if status == "honoured":
                assert re.search(rf"\.{name}\b|\"{name}\"", code), f"{endpoint}: {name} is never read"
    for name, (status, _) in OLLAMA_OPTIONS.items():
        if status == "honoured":
            assert re.search(rf"\.{name}\b", code), f"options.{name} is never read"


@pytest.mark.parametrize("endpoint", list(FIELDS))
def test_refused_and_unknown_fields_answer_400_naming_them(http, model, endpoint) -> None:
    refused = [k for k, (status, _) in FIELDS[endpoint].items() if status == "400"]
    for name in refused + ["no_such_field_xyz"]:
        reply = _post(http, endpoint, {**minimal(endpoint, model), name: 1})
        assert reply.status_code == 400, (endpoint, name, reply.text)
        assert name in reply.text, (endpoint, name, reply.text)


@pytest.mark.parametrize("endpoint", list(FIELDS))
def test_ignored_fields_are_accepted_as_the_reference_accepts_them(http, model, endpoint) -> None:
    ignored = [k for k, (status, _) in FIELDS[endpoint].items() if status == "ignored"]
    for name in ignored:
        reply = _post(http, endpoint, {**minimal(endpoint, model), name: True})
        assert reply.status_code == 200, (endpoint, name, reply.text)


def test_unknown_ollama_options_are_warned_once_not_refused(http, model, live_server) -> None:
    body = {**minimal("POST /api/generate", model), "options": {"num_predict": 1, "mirostat": 2, "made_up": 1}}
    for _ in range(2):
        assert _post(http, "POST /api/generate", body).status_code == 200
    warnings = [line for line in live_server.log().splitlines() if "options not applied" in line]
    assert len(warnings) == 1 and "made_up" in warnings[0] and "mirostat" in warnings[0]


def test_nested_parts_are_strict_too(http, model) -> None:
    body = minimal("POST /v1/chat/completions", model)
    reply = _post(http, "POST /v1/chat/completions",
                  {**body, "messages": [{"role": "user", "content": "hi", "bogus": 1}]})
    assert reply.status_code == 400 and "bogus" in reply.text


def test_readme_carries_the_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README's field table is stale: python -m app.server.fields"

