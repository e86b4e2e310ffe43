"""GgufFile (engines/torch/load/gguf_file.py) reads what gguf.GGUFReader reads, value for
value and byte for byte, in a fraction of its time; a damaged file is a ModelLoadError."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from engines.errors import ModelLoadError
from engines.torch.load.gguf_file import GgufFile
from engines.torch.load.gguf_loader import bundled_model_path


def _same_as_reader(path) -> GgufFile:
    ours, theirs = GgufFile(path), gguf.GGUFReader(str(path))
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == \
               (b.tensor_type, b.n_elements, b.n_bytes, b.data_offset), a.name
        assert list(a.shape) == list(b.shape) and a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name
    return ours


def _write(path, extra=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("t.u32", 7)
    writer.add_int64("t.i64", -3)
    writer.add_float32("t.f32", 0.5)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.25, -1.5])
    writer.add_array("t.strs", ["a", "", "ü<|fim_prefix|>"])
    writer.add_array("t.bools", [True, False])
    writer.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("f16", np.ones((2, 8), dtype=np.float16))
    blocks = np.random.default_rng(0).integers(0, 256, size=(4, 2 * 18), dtype=np.uint8)
    writer.add_tensor("q4", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_0)   # 4 rows of 64 weights
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_every_value_type_and_tensor_kind_reads_as_gguf_reader_reads_it(tmp_path):
    ours = _same_as_reader(_write(tmp_path / "all.gguf"))
    assert ours.metadata["t.strs"] == ["a", "", "ü<|fim_prefix|>"] and ours.metadata["t.bools"] == [True, False]


def test_the_bundled_model_reads_as_gguf_reader_reads_it():
    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled model is not installed")
    ours = _same_as_reader(path)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152


def test_a_truncated_file_is_a_load_error(tmp_path):
    path = _write(tmp_path / "whole.gguf")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for end in (2, 30, len(data) // 3, len(data) - 40):   # the last: into the last tensor, past its padding
        cut.write_bytes(data[:end])
        with pytest.raises(ModelLoadError):
            GgufFile(cut)


def test_a_version_or_alignment_it_cannot_read_is_a_load_error(tmp_path):
    data = bytearray(_write(tmp_path / "v.gguf").read_bytes())
    struct.pack_into("<I", data, 4, 9)
    (tmp_path / "v9.gguf").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="version 9"):
        GgufFile(tmp_path / "v9.gguf")
    with pytest.raises(ModelLoadError, match="power of two"):
        GgufFile(_write(tmp_path / "align.gguf", {"general.alignment": 24}))
