"""A torch engine's cached conversations survive an unload (the daemon's shutdown) bit-exact.

Real parts: a tiny random-weight GGUF file, the torch engine on the CPU with its
KV in kvcached host-backend pages, the KV disk tier in a tmp dir. The second
engine is a new one over the same file, as after a daemon restart."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import TINY, random_state, write_tiny_gguf  # noqa: E402

from engines.base import ModelInfo  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.torch.engine import TorchEngine  # noqa: E402
from engines.types import GenerateRequest, RequestKind, SamplingParams  # noqa: E402
from kvcached.config import KvcachedConfig  # noqa: E402
from kvcached.standalone import standalone_pool  # noqa: E402

PROMPT = "the cat sat on the mat and then"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kvdisk") / "tiny.gguf"
    write_tiny_gguf(path, TINY, random_state(TINY))
    return path


def make_engine(path: Path, kv_dir: Path, keep: bool = True) -> TorchEngine:
    config = EngineConfig(torch_num_slots=3, torch_max_context=256, torch_prefill_chunk=64,
                          torch_llamacpp_numerics=False, kv_disk_dir=str(kv_dir),
                          kv_disk_models=("tiny",) if keep else ())
    engine = TorchEngine(ModelInfo(name="tiny", path=str(path)), config,
                         standalone_pool(KvcachedConfig(page_size=64 << 10, reserve_pages=0)))
    engine.load()
    return engine


def answer(engine: TorchEngine, prompt: str) -> str:
    request = GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt,
                              sampling=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return "".join(chunk.text for chunk in engine.generate(request))


def cached_slots(engine: TorchEngine) -> dict[int, tuple[list[int], torch.Tensor]]:
    cache = engine.loop.scheduler.prefix_cache
    return {i: (list(s.tokens), engine.store.export_slot(i, len(s.tokens)))
            for i, s in enumerate(cache.slots) if s.tokens}


@pytest.mark.parametrize("paused", [False, True], ids=["idle", "paused"])
def test_a_conversation_comes_back_bit_exact_after_a_restart(gguf_file, tmp_path, paused) -> None:
    first = make_engine(gguf_file, tmp_path)
    reply = answer(first, PROMPT)
    before = cached_slots(first)
    if paused:
        first.pause()
    first.unload()
    assert len(list(tmp_path.glob("*.kv"))) == 1

    second = make_engine(gguf_file, tmp_path)
    try:
        after = cached_slots(second)
        assert [t for t, _ in after.values()] == [t for t, _ in before.values()]
        for (_, kv_after), (_, kv_before) in zip(after.values(), before.values()):
            assert torch.equal(kv_after.view(torch.uint8), kv_before.view(torch.uint8))
        assert list(tmp_path.glob("*.kv")) == []            # taken into the cache
        assert answer(second, PROMPT) == reply               # and the prefix is reused
    finally:
        second.unload()


def test_a_model_that_did_not_opt_in_writes_nothing(gguf_file, tmp_path) -> None:
    engine = make_engine(gguf_file, tmp_path, keep=False)
    answer(engine, PROMPT)
    engine.unload()
    assert list(tmp_path.glob("*")) == []


def test_a_changed_model_file_never_loads_the_old_kv(gguf_file, tmp_path) -> None:
    copy = tmp_path / "model" / "tiny.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf_file.read_bytes())
    kv_dir = tmp_path / "kv"
    engine = make_engine(copy, kv_dir)
    answer(engine, PROMPT)
    engine.unload()
    write_tiny_gguf(copy, TINY, random_state(TINY, seed=1))   # same name, other weights
    engine = make_engine(copy, kv_dir)
    try:
        assert cached_slots(engine) == {}
        assert len(list(kv_dir.glob("*.kv"))) == 1            # foreign now: left, never loaded
    finally:
        engine.unload()


def test_a_corrupted_file_is_refused_with_a_log_line(gguf_file, tmp_path, caplog) -> None:
    engine = make_engine(gguf_file, tmp_path)
    answer(engine, PROMPT)
    engine.unload()
    (saved,) = tmp_path.glob("*.kv")
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0x01
    saved.write_bytes(bytes(data))
    engine = make_engine(gguf_file, tmp_path)
    try:
        assert cached_slots(engine) == {}
        assert "refused" in caplog.text and "checksum" in caplog.text
        assert not saved.exists()
    finally:
        engine.unload()
