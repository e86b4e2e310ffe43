"""benchmarks/constrained.py measures what it says on a tiny random-weight GGUF: the constrained
answer is the schema's JSON, the free run decodes as many tokens, the grammar's time is counted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
from tiny_families import FAMILY_CASES, random_state, write_family_gguf  # noqa: E402

from benchmarks import constrained  # noqa: E402
from engines.base import ModelInfo  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.torch.engine import TorchEngine  # noqa: E402  # noqa: E402
from kvcached.standalone import standalone_pool  # noqa: E402
from engines.types import Constraint, GenerateRequest, RequestKind, SamplingParams  # noqa: E402


def test_one_round_on_a_tiny_model(tmp_path) -> None:
    cfg, extra = FAMILY_CASES["qwen2"]
    cfg = cfg.replace(max_context=4096)
    path = write_family_gguf(tmp_path / "tiny.gguf", cfg, extra, random_state(cfg))
    engine = TorchEngine(ModelInfo(name="tiny", path=str(path), context_length=cfg.max_context),
                         EngineConfig(torch_num_slots=1, torch_llamacpp_numerics=False), standalone_pool())
    engine.load()
    try:
        [row] = constrained.measure(engine, rounds=1, max_tokens=2000)
        chunks = list(engine.generate(GenerateRequest(
            RequestKind.COMPLETION, SamplingParams(max_tokens=2000, temperature=0), prompt=constrained.PROMPT,
            constraint=Constraint("json_schema", json.dumps(constrained.SCHEMA)))))
    finally:
        engine.unload()
    jsonschema.validate(json.loads("".join(c.text for c in chunks)), constrained.SCHEMA)
    assert row["tokens"] == chunks[-1].usage.completion_tokens
    assert row["free_ms_per_token"] > 0 and row["constrained_ms_per_token"] > 0 and row["grammar_host_ms_per_token"] > 0
