"""The torch engine's constrained decoding (llguidance), logprobs and request context, on a tiny
random-weight Qwen2 GGUF: whatever the random model prefers, the answer follows the schema
(bounded integers and enums included) or the GBNF grammar, and logprobs are probabilities."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_families import FAMILY_CASES, random_state, write_family_gguf  # noqa: E402

from engines.base import ModelInfo  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.errors import ContextOverflow, InvalidRequest  # noqa: E402
from engines.torch.engine import TorchEngine  # noqa: E402  # noqa: E402
from kvcached.standalone import standalone_pool  # noqa: E402
from engines.types import Constraint, GenerateRequest, RequestKind, SamplingParams  # noqa: E402
from engines.registry.synthetic import synthetic_info  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 5}, "days": {"type": "integer", "minimum": 2, "maximum": 7},
    "unit": {"enum": ["c", "f"]}, "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["city", "days", "unit", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg, extra = FAMILY_CASES["qwen2"]
    path = write_family_gguf(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.gguf", cfg, extra, random_state(cfg))
    eng = TorchEngine(ModelInfo(name="tiny-qwen2", path=str(path), family="qwen2", context_length=cfg.max_context),
                      EngineConfig(torch_num_slots=2, torch_prefill_chunk=64, max_queue=4,
                                   torch_llamacpp_numerics=False), standalone_pool())
    eng.load()
    yield eng
    eng.unload()


def run(engine, **fields) -> tuple[str, list]:
    sampling = fields.pop("sampling", SamplingParams(max_tokens=600, temperature=0))
    chunks = list(engine.generate(GenerateRequest(RequestKind.COMPLETION, sampling, prompt="Weather:", **fields)))
    return "".join(c.text for c in chunks), chunks


def test_json_schema_output_validates(engine) -> None:
    text, chunks = run(engine, constraint=Constraint("json_schema", json.dumps(SCHEMA)))
    jsonschema.validate(json.loads(text), SCHEMA)
    assert chunks[-1].finish_reason.value == "stop"   # the grammar ended it, not max_tokens
    free, _ = run(engine, sampling=SamplingParams(max_tokens=20, temperature=0))
    with pytest.raises(json.JSONDecodeError):          # unconstrained, this model writes no JSON
        json.loads(free)


def test_the_grammars_end_ends_the_answer_of_a_model_with_no_end_token() -> None:
    """Synthetic models have no end-of-generation token: once the grammar is complete the
    answer ends there, rather than sampling on from a mask that allows nothing."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    eng = TorchEngine(synthetic_info("synthetic/smollm2-135m"),
                      EngineConfig(torch_num_slots=1, torch_max_context=256, torch_llamacpp_numerics=False),
                      standalone_pool())
    eng.load()
    try:
        text, chunks = run(eng, constraint=Constraint("json_schema", json.dumps(schema)),
                           sampling=SamplingParams(max_tokens=200, temperature=0))
    finally:
        eng.unload()
    assert json.loads(text) in ({"ok": True}, {"ok": False})
    assert chunks[-1].finish_reason.value == "stop" and chunks[-1].usage.completion_tokens < 200


def test_sampled_constrained_output_validates_too(engine) -> None:
    for seed in range(3):
        text, _ = run(engine, constraint=Constraint("json_schema", json.dumps(SCHEMA)),
                      sampling=SamplingParams(max_tokens=600, temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=seed))
        jsonschema.validate(json.loads(text), SCHEMA)


def test_gbnf_grammar_is_followed(engine) -> None:
    text, _ = run(engine, constraint=Constraint("gbnf", 'root ::= ("yes" | "no") " " [0-9] [0-9]?'))
    word, number = text.split(" ")
    assert word in ("yes", "no") and number.isdigit() and len(number) <= 2


def test_a_grammar_that_does_not_parse_is_invalid_request(engine) -> None:
    with pytest.raises(InvalidRequest):
        run(engine, constraint=Constraint("gbnf", "root ::= ( unclosed"))


def test_logprobs_are_probabilities(engine) -> None:
    text, chunks = run(engine, top_logprobs=5, sampling=SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    positions = [lp for c in chunks for lp in c.logprobs]
    assert len(positions) == 6
    for lp in positions:
        assert len(lp.top) == 5 and sum(math.exp(v) for _, v in lp.top) <= 1 + 1e-6
        assert lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-5)   # greedy took the likeliest


def test_num_ctx_bounds_the_request(engine) -> None:
    with pytest.raises(ContextOverflow):
        run(engine, num_ctx=4, sampling=SamplingParams(max_tokens=2, temperature=0))
    _, chunks = run(engine, num_ctx=12, sampling=SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    usage = chunks[-1].usage
    assert usage.prompt_tokens + usage.completion_tokens == 12
