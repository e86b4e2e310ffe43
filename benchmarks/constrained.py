"""Constrained decoding's cost per token at batch 1 on the torch engine.

Decodes the same model twice per round: free (ignore_eos, as many tokens as the
constrained answer took) and constrained to a typical JSON schema (a tool
call's arguments: strings, an enum, bounded integers, a short list), greedy.
Reports milliseconds per generated token for both (the engine's own eval time
over the tokens after the first), the overhead in percent, and the time spent
in llguidance's mask and commit alone, host side (wrapped around Guide.mask_/accept).
The goal on the GPU: overhead at most 5% of decode.

  python -m benchmarks.constrained [--model PATH.gguf | synthetic/CONFIG] [--rounds 3]

The GPU machine has no bundled model (its 94 MiB are over what a call carries),
so there it runs `synthetic/smollm2-135m`: random weights and the byte-level
tokenizer of engines/registry/synthetic.py, the same vocabulary size, so the
same mask work per token; the grammar alone ends the answer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.results_io import print_table, write_result
from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.registry.synthetic import PREFIX, synthetic_info
from engines.torch.engine import TorchEngine
from kvcached.standalone import standalone_pool
from engines.torch.load.gguf_loader import bundled_model_path
from engines.torch.serve import guide as guide_module
from engines.types import Constraint, GenerateRequest, RequestKind, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 48},
    "priority": {"enum": ["low", "medium", "high", "urgent"]},
    "estimate_hours": {"type": "integer", "minimum": 1, "maximum": 400},
    "assignees": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 2, "maxItems": 4},
    "description": {"type": "string", "minLength": 60, "maxLength": 200}},
    "required": ["title", "priority", "estimate_hours", "assignees", "description"], "additionalProperties": False}
PROMPT = "File a ticket for the flaky login test in the payments service, as JSON."


class MaskClock:
    """Host time spent in the grammar (mask + commit), summed over a run. The mask's device
    work is queued behind the step and not waited for, as in serving: what it adds to the
    step shows in the per-token figures, not here."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._mask, self._accept = guide_module.Guide.mask_, guide_module.Guide.accept

    def __enter__(self) -> MaskClock:
        clock = self

        def mask(guide, logits):
            t = time.perf_counter()
            clock._mask(guide, logits)
            clock.seconds += time.perf_counter() - t
            clock.calls += 1

        def accept(guide, token):
            t = time.perf_counter()
            clock._accept(guide, token)
            clock.seconds += time.perf_counter() - t

        guide_module.Guide.mask_, guide_module.Guide.accept = mask, accept
        return self

    def __exit__(self, *exc) -> None:
        guide_module.Guide.mask_, guide_module.Guide.accept = self._mask, self._accept


def per_token_ms(engine: TorchEngine, request: GenerateRequest) -> tuple[float, int, str]:
    chunks = list(engine.generate(request))
    usage = chunks[-1].usage
    text = "".join(c.text for c in chunks)
    return usage.eval_ns / 1e6 / max(1, usage.completion_tokens - 1), usage.completion_tokens, text


def measure(engine: TorchEngine, rounds: int, max_tokens: int) -> list[dict]:
    """One row per round: tokens, free and constrained ms per token, overhead, grammar ms per token."""
    rows = []
    for _ in range(rounds):
        constrained = GenerateRequest(RequestKind.COMPLETION, SamplingParams(max_tokens=max_tokens, temperature=0),
                                      prompt=PROMPT, constraint=Constraint("json_schema", json.dumps(SCHEMA)))
        with MaskClock() as clock:
            c_ms, n, text = per_token_ms(engine, constrained)
        try:
            json.loads(text)   # the answer parses (the tests validate it; here it only must be JSON)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"the constrained answer ({n} tokens) is not JSON ({exc}); raise --max-tokens "
                             f"if it was cut. Its text: {text[:300]!r} ... {text[-300:]!r}") from None
        free = GenerateRequest(RequestKind.COMPLETION, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                               prompt=PROMPT)
        f_ms, _, _ = per_token_ms(engine, free)
        rows.append({"tokens": n, "free_ms_per_token": f_ms, "constrained_ms_per_token": c_ms,
                     "overhead_pct": 100 * (c_ms - f_ms) / f_ms,
                     "grammar_host_ms_per_token": 1e3 * clock.seconds / max(1, clock.calls)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=600)
    args = parser.parse_args()
    args.model = args.model or str(bundled_model_path())
    info = synthetic_info(args.model) if args.model.startswith(PREFIX) else ModelInfo(name="bench", path=args.model)
    engine = TorchEngine(info,
                         EngineConfig(torch_num_slots=1, torch_max_context=2048, torch_llamacpp_numerics=False), standalone_pool())
    engine.load()
    rows = measure(engine, args.rounds, args.max_tokens)
    engine.unload()
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print_table(list(summary), [list(r.values()) for r in rows] + [list(summary.values())])
    write_result("constrained", {"model": args.model, "batch": 1, "schema": SCHEMA, "rounds": rows,
                                 "median": summary, "goal": "overhead_pct <= 5 on the GPU"})


if __name__ == "__main__":
    main()
