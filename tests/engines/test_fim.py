"""Fill-in-the-middle: FIM tokens from metadata or vocabulary, prompt assembly,
and a clear typed error for models without FIM (the default SmolLM2 has none)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from text_fixtures import gguf_meta, tokenizer  # noqa: E402,F401

from engines.errors import InfillUnsupported  # noqa: E402
from engines.text.fim import FimTokens, build_infill_ids, can_infill, find_fim_tokens  # noqa: E402

QWEN_STYLE = ["a", "b", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>"]


def fake_encode(text: str) -> list[int]:
    return [1000 + ord(c) for c in text]


def test_default_model_cannot_infill(gguf_meta, tokenizer):
    assert not can_infill(tokenizer.vocab, gguf_meta)
    fim = find_fim_tokens(tokenizer.vocab, gguf_meta)
    with pytest.raises(InfillUnsupported, match="fill-in-the-middle"):
        build_infill_ids(tokenizer.encode, fim, "def f(", "):")


def test_tokens_found_by_vocabulary_spelling():
    fim = find_fim_tokens(QWEN_STYLE)
    assert fim == FimTokens(pre=2, suf=4, mid=3, pad=5, rep=6, sep=7)


def test_metadata_ids_win_over_spelling():
    vocab = ["<PRE>", "<SUF>", "<MID>", "x", "y", "z"]
    meta = {"tokenizer.ggml.fim_pre_token_id": 3, "tokenizer.ggml.fim_suf_token_id": 4,
            "tokenizer.ggml.middle_token_id": 5}
    assert find_fim_tokens(vocab, meta) == FimTokens(pre=3, suf=4, mid=5)
    assert find_fim_tokens(vocab) == FimTokens(pre=0, suf=1, mid=2)


def test_partial_fim_set_cannot_infill():
    assert not can_infill(["<|fim_prefix|>", "<|fim_suffix|>"])


def test_prefix_suffix_middle_order_with_bos():
    fim = FimTokens(pre=2, suf=4, mid=3)
    ids = build_infill_ids(fake_encode, fim, "ab", "c", bos_id=9)
    assert ids == [9, 2, 1097, 1098, 4, 1099, 3]


def test_extra_context_with_repo_and_file_separators():
    fim = find_fim_tokens(QWEN_STYLE)
    ids = build_infill_ids(fake_encode, fim, "p", "s", extra_context=["x"])
    assert ids == [6, *fake_encode("myproject\n"), 7, *fake_encode("x"), 7,
                   2, *fake_encode("p"), 4, *fake_encode("s"), 3]


def test_extra_context_without_separators_is_plain_text():
    fim = FimTokens(pre=2, suf=4, mid=3)
    ids = build_infill_ids(fake_encode, fim, "p", "s", extra_context=["x", "y\n"])
    assert ids == [*fake_encode("x\ny\n"), 2, *fake_encode("p"), 4, *fake_encode("s"), 3]
