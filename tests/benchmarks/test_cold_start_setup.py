"""benchmarks/cold_start.py's 8B case set-up: the shape written as random Q4_K_M blocks, and
llama.cpp's llama-completion restored from a prebuilt carried in .gpu/ while the file is written
(the timing itself needs the GPU: scripts/gpu_check.sh cold_start_8b)."""
from __future__ import annotations

from gguf import GGUFReader

from benchmarks import cold_start, llama_prebuilt, shape_gguf
from tests.benchmarks.test_llama_prebuilt import fake_bin


def test_the_peers_completion_comes_from_the_carried_prebuilt(tmp_path, monkeypatch):
    sources = tmp_path / "carried" / "llama.cpp-src.tar.xz"
    sources.parent.mkdir()
    sources.write_bytes(b"the sources")
    llama_prebuilt.pack(fake_bin(tmp_path / "machine1", size=1000), sources, sources.parent)
    monkeypatch.setattr(cold_start, "_ROOT", tmp_path / "repo")
    ready = cold_start.peer_completion(sources)
    binary = ready()
    assert binary == tmp_path / "repo" / "build" / "quant" / "llama.cpp-build" / "bin" / "llama-completion"
    assert binary.exists()


def test_a_named_shape_is_written_once_as_q4_k_m_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(shape_gguf, "BLOCK_SHAPES", tmp_path)
    path = shape_gguf.named_block_shape("smollm2-135m")
    types = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert {"Q4_K", "Q6_K"} <= types
    written = path.stat().st_mtime_ns
    assert shape_gguf.named_block_shape("smollm2-135m") == path and path.stat().st_mtime_ns == written   # kept


def test_a_files_read_rates_from_disk_and_page_cache(tmp_path):
    from benchmarks.read_rate import file_read_rates

    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(8 << 20))
    rates = file_read_rates(path)
    assert rates["disk_gb_s"] > 0 and rates["page_cache_gb_s"] > 0 and isinstance(rates["dropped"], bool)
