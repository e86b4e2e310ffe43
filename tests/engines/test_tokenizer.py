"""Tokenization identical to llama.cpp's on the default model, on varied text.

The reference is llama.cpp itself (llama-cpp-python's vocab-only model on the
same GGUF file), with and without special-token parsing, with and without BOS.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from text_fixtures import gguf_meta, tokenizer  # noqa: E402,F401

from engines.errors import ModelLoadError  # noqa: E402
from engines.text.tokenizer import (  # noqa: E402
    PRE_TOKENIZER_REGEXES,
    BpeTokenizer,
    StreamDecoder,
    load_tokenizer,
)
from engines.torch.load.gguf_loader import bundled_model_path  # noqa: E402

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "    indented = 4\n        deeper = 8\n",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F",
    "I'm, you're, they've, we'll, she'd, it's, DON'T",
    "héllo wörld, ça va? naïve café résumé",
    "日本語のテキストと中文文本",
    "Привет мир! Γειά σου κόσμε",
    "emoji 🤗🚀👩‍👩‍👧‍👦 flags 🇫🇷 and ❤️",
    "mixed\u00a0nbsp\u200bzero-width\u2028line-sep",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "literal <|endoftext|> special mid-text and <unk>",
    "   \n\t  \n",
    "!!!??? ... --- ___ *** ``` ~~~",
    "https://example.com/path?q=1&r=two#frag",
    "a" * 300 + " " + "ab" * 150,
    "",
]


@pytest.fixture(scope="module")
def reference():
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(bundled_model_path()), vocab_only=True, verbose=False)


@pytest.mark.parametrize("parse_special", [True, False])
def test_encode_matches_llamacpp(tokenizer, reference, parse_special):
    for text in TEXTS:
        want = reference.tokenize(text.encode(), add_bos=False, special=parse_special)
        assert tokenizer.encode(text, parse_special=parse_special) == want, text


def test_add_special_follows_metadata(tokenizer, reference, gguf_meta):
    # SmolLM2's GGUF says add_bos_token = False; llama.cpp honours that.
    assert gguf_meta["tokenizer.ggml.add_bos_token"] is False
    text = "Hello"
    assert tokenizer.encode(text, add_special=True) == reference.tokenize(text.encode(), add_bos=True)


def test_decode_round_trips_and_matches_llamacpp(tokenizer, reference):
    for text in TEXTS:
        ids = tokenizer.encode(text, parse_special=False)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids) == reference.detokenize(ids).decode("utf-8", errors="replace")


def test_control_tokens_skipped_unless_asked(tokenizer):
    ids = tokenizer.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "user"
    assert tokenizer.decode(ids, skip_special=False) == "<|im_start|>user<|im_end|>"


def test_stream_decoder_never_splits_characters(tokenizer):
    text = "a🤗b 日本 👩‍👩‍👧 é"
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.feed(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_unknown_pre_tokenizer_is_load_error(gguf_meta):
    meta = dict(gguf_meta, **{"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(ModelLoadError, match="no-such-pre"):
        BpeTokenizer(meta)


def test_missing_vocabulary_is_load_error():
    with pytest.raises(ModelLoadError, match="vocabulary"):
        load_tokenizer({"tokenizer.ggml.model": "gpt2"})


def test_pre_tokenizer_table_covers_common_families():
    for pre in ("smollm", "llama-bpe", "qwen2", "gpt2", "starcoder", "default"):
        assert pre in PRE_TOKENIZER_REGEXES
