"""A paused llama.cpp context under host pressure: its sequences spill to files and come
back as they were; a damaged file is refused and that conversation re-evaluated.

Real parts: the bundled model on the real llama.cpp engine, files in a tmp data dir."""
from __future__ import annotations

import pytest

from engines.llamacpp.engine import LlamaCppEngine
from engines.types import ModelState
from kvcached.kv_cache import spill_file
from llamacpp_support import default_info, small_config
from test_llamacpp_pause import FIRST, SECOND, ChatMessage, chat


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    data = tmp_path_factory.mktemp("llama-spill")
    engine = LlamaCppEngine(default_info(), small_config(kv_disk_dir=str(data)))
    engine.load()
    engine.data_dir = data
    yield engine
    engine.unload()


def spills(engine) -> list:
    return list((engine.data_dir / "spill").glob(f"*{spill_file.SUFFIX}"))


def two_turns(engine: LlamaCppEngine, between) -> tuple[str, str, object]:
    engine.drop_prefixes()
    reply1, _ = chat(engine, FIRST)
    between()
    reply2, usage2 = chat(engine, FIRST, ChatMessage("assistant", reply1), SECOND)
    return reply1, reply2, usage2


def test_spilled_sequences_resume_as_they_were(engine):
    plain = two_turns(engine, lambda: None)

    def pause_and_spill() -> None:
        engine.pause()
        held = engine.memory().paused_host_bytes
        freed = engine.relieve_host()
        report = engine.memory()
        assert freed >= held > 0 and report.paused_host_bytes == 0 and report.paused_disk_bytes == held
        assert len(spills(engine)) >= 1 and engine.state is ModelState.PAUSED

    spilled = two_turns(engine, pause_and_spill)
    assert spilled[:2] == plain[:2] and not spills(engine)
    assert spilled[2].cached_tokens == plain[2].cached_tokens > 0      # the first turn was not re-read


def test_a_damaged_spill_is_refused_and_the_turn_re_evaluated(engine, caplog):
    plain = two_turns(engine, lambda: None)

    def pause_spill_and_damage() -> None:
        engine.pause()
        engine.relieve_host()
        for path in spills(engine):
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))

    damaged = two_turns(engine, pause_spill_and_damage)
    assert damaged[:2] == plain[:2]                                   # the same answer, computed again
    assert damaged[2].cached_tokens == 0 and "refused" in caplog.text and not spills(engine)


def test_unload_removes_spilled_files(tmp_path):
    engine = LlamaCppEngine(default_info(), small_config(kv_disk_dir=str(tmp_path)))
    engine.load()
    chat(engine, FIRST)
    engine.pause()
    engine.relieve_host()
    assert list((tmp_path / "spill").iterdir())
    engine.unload()
    assert not list((tmp_path / "spill").iterdir())
