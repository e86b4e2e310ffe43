"""The host short of memory: a paused torch model spills its KV to disk and comes back
bit-exact; a damaged spill is never read into the model, whose conversation is then
computed again.

Real parts: a tiny random-weight GGUF, the torch engine on the CPU with its KV in
kvcached host-backend pages, files in a tmp data dir, the real Broker and the
real HostRelief watch, whose reading of /proc/meminfo is the one scripted part
(a host cannot be made short of memory on purpose in a test)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_torch import tiny_engine, write_tiny  # noqa: E402
from tiny_torch import ask as ask_tokens  # noqa: E402

from engines.broker_client import register_engine  # noqa: E402
from engines.torch.engine import TorchEngine  # noqa: E402
from engines.types import ModelState  # noqa: E402
from kvcached.broker import Broker  # noqa: E402
from kvcached.broker.host_relief import HostRelief  # noqa: E402
from kvcached.config import KvcachedConfig  # noqa: E402
from kvcached.kv_cache import spill_file  # noqa: E402

PROMPT = "the cat sat on the mat and then the dog ran"
GiB = 1 << 30


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("relief") / "tiny.gguf")


def make_engine(path: Path, data_dir: Path, **config) -> TorchEngine:
    return tiny_engine(path, kv_disk_dir=str(data_dir), **config)


def ask(engine: TorchEngine, prompt: str):
    return ask_tokens(engine, prompt, max_tokens=6)


def slot_kv(engine: TorchEngine) -> list[torch.Tensor]:
    cache = engine.loop.scheduler.prefix_cache
    return [engine.store.export_slot(i, len(s.tokens)) for i, s in enumerate(cache.slots) if s.tokens]


def spills(data_dir: Path) -> list[Path]:
    return list((data_dir / "spill").glob(f"*{spill_file.SUFFIX}"))


def test_host_pressure_spills_a_paused_model_and_it_resumes_bit_exact(gguf_file, tmp_path):
    engine = make_engine(gguf_file, tmp_path)
    broker = Broker(KvcachedConfig(backend="host"))
    register_engine(broker, engine)
    available = [8 * GiB]
    relief = HostRelief(broker, low_bytes=1 * GiB, read=lambda: (available[0], None))
    try:
        reply, first = ask(engine, PROMPT)
        before = slot_kv(engine)
        engine.pause()
        assert relief.tick() == 0 and not spills(tmp_path)          # the host has room: nothing moves
        available[0] = GiB // 2                                      # another app took the host's memory
        freed = relief.tick()
        report = engine.memory()
        assert freed > 0 and len(spills(tmp_path)) == 1
        assert report.paused_host_bytes == 0 and report.paused_disk_bytes > 0
        assert [e.step for e in broker.events.recent()][-1] == "host_relief"
        engine.resume()                                              # reads the file back
        assert engine.state is ModelState.LOADED and not spills(tmp_path)
        after = slot_kv(engine)
        assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
        _, usage = ask(engine, PROMPT + reply)
        assert usage.cached_tokens >= first.prompt_tokens              # no prefill of the first turn
    finally:
        broker.close()
        engine.unload()


def test_a_damaged_spill_is_refused_and_the_conversation_computed_again(gguf_file, tmp_path, caplog):
    reference = make_engine(gguf_file, tmp_path / "ref")
    expected = ask(reference, PROMPT + " again")[0]
    reference.unload()
    engine = make_engine(gguf_file, tmp_path)
    try:
        ask(engine, PROMPT)
        engine.pause()
        assert engine.relieve_host() > 0
        [path] = spills(tmp_path)
        data = bytearray(path.read_bytes())
        data[-40] ^= 0xFF                                            # one flipped byte in the payload
        path.write_bytes(bytes(data))
        reply, usage = ask(engine, PROMPT + " again")
        assert reply == expected and usage.cached_tokens == 0        # recomputed, not read from the file
        assert "paused conversations lost" in caplog.text and "checksum mismatch" in caplog.text
        assert not path.exists()
    finally:
        engine.unload()


def test_a_model_whose_weights_wait_in_host_memory_is_unloaded_when_the_host_is_short(gguf_file, tmp_path):
    engine = make_engine(gguf_file, tmp_path, torch_weights_to_host=True)
    broker = Broker(KvcachedConfig(backend="host"))
    register_engine(broker, engine)
    relief = HostRelief(broker, low_bytes=1 * GiB, read=lambda: (GiB // 2, None))
    try:
        expected, _ = ask(engine, PROMPT)
        engine.weights_to_host()
        on_host = engine.memory().weights_host_bytes
        assert on_host > 0
        assert relief.tick() >= on_host and engine.state is ModelState.UNLOADED
        assert ask(engine, PROMPT)[0] == expected                     # loaded again from the file
    finally:
        broker.close()
        engine.unload()
