"""Constrained decoding on the llama.cpp engine: llama.cpp's own grammar sampler.

A JSON schema becomes GBNF through llama-cpp-python's port of llama.cpp's
converter (`llama_cpp.llama_grammar.json_schema_to_gbnf`, the same rules as
`json-schema-to-grammar.cpp` in the server); a GBNF grammar from a client
(llama.cpp's `grammar` field) is used as given. The sampler
(`llama_sampler_init_grammar`) runs first in the chain and lets an
end-of-generation token through only where the grammar is complete.

The Python port lags the C++ converter in one place that matters for tool
arguments: it ignores `minimum` / `maximum` on integers (the C++ one builds
digit-range rules). `lower_schema` rewrites a bounded integer of up to
MAX_ENUM_RANGE values as the enum of those values, which the port honours;
a wider range stays unbounded (the output still parses; the bound is not
enforced: the torch engine's llguidance enforces it).
"""
from __future__ import annotations

import json

import llama_cpp
from llama_cpp.llama_grammar import json_schema_to_gbnf

from engines.errors import InvalidRequest
from engines.types import Constraint


MAX_ENUM_RANGE = 1024


def _bounded_integers(node):
    """The schema with every small bounded integer range written as an enum (see above)."""
    if isinstance(node, list):
        return [_bounded_integers(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_integers(v) for k, v in node.items()}
    low = out.get("minimum", out["exclusiveMinimum"] + 1 if isinstance(out.get("exclusiveMinimum"), int) else None)
    high = out.get("maximum", out["exclusiveMaximum"] - 1 if isinstance(out.get("exclusiveMaximum"), int) else None)
    if out.get("type") == "integer" and isinstance(low, int) and isinstance(high, int) \
            and 0 <= high - low < MAX_ENUM_RANGE:
        rest = {k: v for k, v in out.items()
                if k not in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")}
        return {**rest, "enum": list(range(low, high + 1))}
    return out


def lower_schema(text: str) -> str:
    return json.dumps(_bounded_integers(json.loads(text)))


def gbnf_of(constraint: Constraint) -> str:
    if constraint.kind == "gbnf":
        return constraint.text
    try:
        return json_schema_to_gbnf(lower_schema(constraint.text))
    except Exception as exc:   # the converter's failures on odd schemas are of every kind
        raise InvalidRequest(f"json schema: cannot be turned into a grammar: {exc}") from None


def grammar_sampler(vocab: llama_cpp.llama_vocab_p, constraint: Constraint) -> llama_cpp.llama_sampler_p:
    """A native grammar sampler; InvalidRequest where llama.cpp cannot parse the grammar."""
    native = llama_cpp.llama_sampler_init_grammar(vocab, gbnf_of(constraint).encode(), b"root")
    if not native:
        raise InvalidRequest("grammar: llama.cpp could not parse it (it must define `root`)")
    return native
