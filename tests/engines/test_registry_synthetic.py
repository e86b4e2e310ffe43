"""The synthetic registry source: names that resolve to named configs, and nothing else."""
from __future__ import annotations

import pytest

from engines.errors import ModelLoadError, ModelNotFound
from engines.registry.synthetic import parse_name, scan_synthetic, synthetic_info, synthetic_names
from engines.torch.model.configs import NAMED_CONFIGS


def test_names_carry_config_and_copy_tag() -> None:
    assert parse_name("synthetic/llama-3.1-8b:b") == ("llama-3.1-8b", "b")
    assert parse_name("synthetic/smollm2-135m") == ("smollm2-135m", "")
    info = synthetic_info("synthetic/llama-3.1-8b:c")
    assert info.source == "synthetic" and info.path == "" and info.metadata["config"] == "llama-3.1-8b"
    cfg = NAMED_CONFIGS["llama-3.1-8b"]
    assert info.size_bytes == 2 * cfg.num_params
    assert info.metadata["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, bf16


@pytest.mark.parametrize("name", ["llama-3.1-8b", "synthetic/", "synthetic/../../etc/passwd",
                                  "synthetic/gpt-5", "/synthetic/llama-3.1-8b"])
def test_anything_else_is_not_found(name: str) -> None:
    with pytest.raises(ModelNotFound):
        synthetic_info(name)


def test_listing_has_each_config_and_its_copies() -> None:
    names = synthetic_names(["llama-3.1-8b"], copies=("a", "b"))
    assert names == ["synthetic/llama-3.1-8b", "synthetic/llama-3.1-8b:a", "synthetic/llama-3.1-8b:b"]
    listed = {info.name for info in scan_synthetic()}
    assert {f"synthetic/{c}:c" for c in NAMED_CONFIGS} <= listed
    with pytest.raises(ModelNotFound):
        synthetic_names(["nope"])


def test_synthetic_tokenizer_needs_no_file_and_streams_text_for_every_id() -> None:
    from engines.registry.synthetic import tokenizer_meta
    from engines.text.tokenizer import StreamDecoder, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_meta(NAMED_CONFIGS["llama-3.2-1b"].vocab_size))
    text = "def f(x):\n    return 'wörld' <|im_start|>"
    ids = tokenizer.encode(text, add_special=True)
    assert ids == list(text.encode("utf-8"))          # one token per byte, no BOS
    assert tokenizer.decode(ids) == text
    decoder = StreamDecoder(tokenizer)
    assert [decoder.feed(i) for i in (300, 128255)] == [" w300", " w128255"]
    with pytest.raises(ModelLoadError):
        tokenizer_meta(100)
