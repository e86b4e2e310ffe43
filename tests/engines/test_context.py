"""The default context (engines/context.py): trained length, bounded by the setting and the KV budget."""
from __future__ import annotations

from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.context import MIN_CONTEXT, served_context
from engines.llamacpp.options import context_n_ctx


def test_trained_length_when_it_fits() -> None:
    assert served_context(8192, 32768, 1000, 1 << 30) == 8192


def test_bounded_by_the_setting_and_by_the_budget() -> None:
    assert served_context(131072, 32768, 1000, 1 << 40) == 32768
    assert served_context(131072, 32768, 1 << 20, 4 << 30) == 4096     # 4 GiB of 1 MiB tokens
    assert served_context(131072, 32768, 1 << 30, 1 << 30) == MIN_CONTEXT


def test_llamacpp_engine_follows_it_and_an_override_wins() -> None:
    meta = {"block_count": 30, "head_count": 9, "head_count_kv": 3, "embedding_length": 576}
    info = ModelInfo("m", "", context_length=8192, metadata=meta)
    assert context_n_ctx(EngineConfig(), info) == 8192
    assert context_n_ctx(EngineConfig(max_context=4096), info) == 4096
    assert context_n_ctx(EngineConfig(llama_n_ctx=1024), info) == 1024
    assert context_n_ctx(EngineConfig(context_overrides={"m": 2048}), info) == 2048
    # 23,040 bytes a token: a 64 MiB budget holds 2,912 tokens
    assert context_n_ctx(EngineConfig(kv_budget_bytes=64 << 20), info) == (64 << 20) // 23040
