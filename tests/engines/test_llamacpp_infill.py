"""Fill-in-the-middle with a model's FIM tokens. SmolLM2 has none, so the real default
model is loaded with llama.cpp metadata overrides that give it three (its special
tokens 3, 4, 5): llama.cpp then reports FIM tokens, and the engine's prompt must be
prefix-suffix-middle around them, and generation must run on it."""
from __future__ import annotations

import ctypes

import llama_cpp
import pytest
from llama_cpp import _internals as internals

from engines.config import EngineConfig
from engines.errors import InfillUnsupported
from engines.llamacpp import options
from engines.llamacpp.batcher import Batcher
from engines.llamacpp.generation import Sequence
from engines.llamacpp.prompt import PromptBuilder
from engines.llamacpp.session import Session
from engines.types import FinishReason, GenerateRequest, RequestKind, SamplingParams
from llamacpp_support import default_gguf, small_config

FIM_IDS = {"tokenizer.ggml.fim_pre_token_id": 3, "tokenizer.ggml.fim_suf_token_id": 4,
           "tokenizer.ggml.fim_mid_token_id": 5}


def _overrides(values: dict[str, int]):
    array = (llama_cpp.llama_model_kv_override * (len(values) + 1))()   # last one: the terminator
    for slot, (key, value) in zip(array, values.items()):
        slot.key = key.encode()
        slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
        slot.value.val_i64 = value
    return array


@pytest.fixture(scope="module")
def fim_model():
    params = options.model_params(EngineConfig()).params
    array = _overrides(FIM_IDS)
    params.kv_overrides = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    model = internals.LlamaModel(path_model=str(default_gguf()), params=params, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def plain_model():
    model = internals.LlamaModel(path_model=str(default_gguf()),
                                 params=options.model_params(EngineConfig()).params, verbose=False)
    yield model
    model.close()


def infill(prefix: str, suffix: str) -> GenerateRequest:
    return GenerateRequest(kind=RequestKind.INFILL, prompt=prefix, suffix=suffix,
                           sampling=SamplingParams(temperature=0, max_tokens=4))


def test_infill_prompt_is_prefix_suffix_middle(fim_model) -> None:
    builder = PromptBuilder(fim_model, "")
    assert builder.can_infill
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    ids = builder.build(infill(prefix, suffix))
    encode = lambda text: builder.tokenize(text, add_bos=False, special=False)
    assert ids == [3, *encode(prefix), 4, *encode(suffix), 5]


def test_infill_generates_after_the_middle_token(fim_model) -> None:
    builder = PromptBuilder(fim_model, "")
    prompt = builder.build(infill("x = ", "\n"))
    session = Session(fim_model, options.context_params(small_config(), 256))
    chunks: list = []
    batcher = Batcher("fim", 1, lambda: session, lambda: 0, wake=lambda: None)
    try:
        batcher.submit(Sequence(infill("x = ", "\n"), prompt, chunks.append, on_end=lambda: None,
                                vocab=fim_model.vocab, n_ctx=session.n_ctx))
        while batcher.has_work:
            batcher.step()
    finally:
        session.close()
    assert chunks[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_a_model_without_fim_tokens_refuses_clearly(plain_model) -> None:
    builder = PromptBuilder(plain_model, "")
    assert not builder.can_infill
    with pytest.raises(InfillUnsupported, match="fill-in-the-middle"):
        builder.build(infill("a", "b"))
