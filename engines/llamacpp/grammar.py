"""Constrained decoding on the llama.cpp engine: llama.cpp's own grammar sampler.

A JSON schema becomes GBNF through llama-cpp-python's port of llama.cpp's
converter (`llama_cpp.llama_grammar.json_schema_to_gbnf`, the same rules as
`json-schema-to-grammar.cpp` in the server); a GBNF grammar from a client
(llama.cpp's `grammar` field) is used as given. The sampler
(`llama_sampler_init_grammar`) runs first in the chain and lets an
end-of-generation token through only where the grammar is complete.
"""
from __future__ import annotations

import llama_cpp
from llama_cpp.llama_grammar import json_schema_to_gbnf

from engines.errors import InvalidRequest
from engines.types import Constraint


def gbnf_of(constraint: Constraint) -> str:
    if constraint.kind == "gbnf":
        return constraint.text
    try:
        return json_schema_to_gbnf(constraint.text)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidRequest(f"json schema: cannot be turned into a grammar: {exc}") from None


def grammar_sampler(vocab: llama_cpp.llama_vocab_p, constraint: Constraint) -> llama_cpp.llama_sampler_p:
    """A native grammar sampler; InvalidRequest where llama.cpp cannot parse the grammar."""
    native = llama_cpp.llama_sampler_init_grammar(vocab, gbnf_of(constraint).encode(), b"root")
    if not native:
        raise InvalidRequest("grammar: llama.cpp could not parse it (it must define `root`)")
    return native
