"""The GGUF header reader on the real default model and on broken files."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from gguf import GGUFWriter

from engines.errors import ModelLoadError
from engines.registry.gguf_meta import read_gguf_meta
from llamacpp_support import default_gguf


def test_reads_the_default_model_header() -> None:
    meta = read_gguf_meta(default_gguf())
    assert meta.architecture == "llama"
    assert meta.quantization == "Q4_1"
    assert meta.context_length == 8192
    assert meta.block_count == 30 and meta.head_count == 9 and meta.head_count_kv == 3
    assert meta.vocab_size == 49152
    assert 130e6 < meta.parameter_count < 140e6       # "135M"
    assert meta.fim_token_ids is None and not meta.can_infill
    assert "<|im_start|>" in meta.chat_template


def _write_tiny_gguf(path: Path, fim: str) -> None:
    """A real GGUF written by the gguf package: a 2-tensor 'model' with FIM either in
    the metadata keys, only in the vocabulary, or absent."""
    import numpy as np

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(1024)
    writer.add_block_count(1)
    tokens = [f"t{i}" for i in range(100)] + ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    if fim == "none":
        tokens = tokens[:100]
    writer.add_token_list(tokens)
    if fim == "keys":
        writer.add_uint32("tokenizer.ggml.fim_pre_token_id", 100)
        writer.add_uint32("tokenizer.ggml.fim_suf_token_id", 101)
        writer.add_uint32("tokenizer.ggml.fim_mid_token_id", 102)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.zeros((8,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("fim,expected", [("keys", (100, 101, 102)), ("vocab", (100, 101, 102)),
                                          ("none", None)])
def test_fim_tokens_from_keys_or_vocabulary(tmp_path: Path, fim: str, expected) -> None:
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, fim)
    meta = read_gguf_meta(path)
    assert meta.fim_token_ids == expected
    assert meta.parameter_count == 4 * 8 + 8
    assert meta.context_length == 1024
    assert meta.quantization == "F32"   # no file_type key: the weight matrices' type


@pytest.mark.parametrize("content", [b"", b"GGUF", b"NOTAGGUF" * 8,
                                     struct.pack("<IIQQ", 0x46554747, 3, 1, 5) + b"\x00" * 7,
                                     struct.pack("<IIQQ", 0x46554747, 99, 0, 0)])
def test_broken_files_raise_a_typed_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        read_gguf_meta(path)


def test_missing_file_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        read_gguf_meta(tmp_path / "absent.gguf")


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_tiny_gguf(path, "keys")
    return path.read_bytes()


def test_corrupt_headers_never_crash(tmp_path_factory, tiny_gguf_bytes: bytes) -> None:
    """Flipped bytes and truncations anywhere in a real header: a result or ModelLoadError,
    never another exception (a broken download must not break the model list)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    folder = tmp_path_factory.mktemp("corrupt")
    header_len = min(len(tiny_gguf_bytes), 4096)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, header_len - 1), st.integers(0, 255)), max_size=4),
           st.integers(8, len(tiny_gguf_bytes)))
    def check(flips: list[tuple[int, int]], cut: int) -> None:
        data = bytearray(tiny_gguf_bytes[:cut])
        for pos, value in flips:
            if pos < len(data):
                data[pos] = value
        path = folder / "c.gguf"
        path.write_bytes(bytes(data))
        try:
            read_gguf_meta(path)
        except ModelLoadError:
            pass

    check()
