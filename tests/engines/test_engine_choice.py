"""Engine choice per model, the factory, the engines config and load-progress reporting."""
from __future__ import annotations

import pytest

from engines.base import ModelInfo
from engines.choice import choose_engine
from engines.config import EngineConfig
from engines.factory import create_engine, engine_class
from engines.progress import ProgressReporter
from engines.types import LoadProgress
from kvcached.errors import ConfigError
from llamacpp_support import default_info

LLAMA = ModelInfo(name="smollm2:135m", path="/m.gguf", family="llama")
GEMMA = ModelInfo(name="gemma3n:e2b", path="/g.gguf", family="gemma3n")
SYNTH = ModelInfo(name="llama-8b-random", path="", source="synthetic")


@pytest.mark.parametrize("info, has_cuda, expected", [
    (LLAMA, True, "torch"), (LLAMA, False, "llamacpp"),
    (GEMMA, True, "llamacpp"),            # a family the torch engine does not implement
    (SYNTH, False, "torch"),              # random weights exist only for torch
])
def test_auto_choice_by_device_and_family(info, has_cuda, expected) -> None:
    assert choose_engine(info, EngineConfig(), has_cuda).engine == expected


def test_per_model_override_wins_then_the_default() -> None:
    config = EngineConfig(default_engine="torch", engine_overrides={"smollm2:135m": "llamacpp"})
    assert choose_engine(LLAMA, config, True).engine == "llamacpp"
    assert choose_engine(GEMMA, config, False).engine == "torch"
    assert "set for smollm2:135m" in choose_engine(LLAMA, config, True).reason


@pytest.mark.parametrize("values", [dict(default_engine="gpu"), dict(engine_overrides={"m": "vllm"}),
                                    dict(llama_n_ctx=0), dict(max_queue=-1), dict(llama_n_gpu_layers=-2),
                                    dict(context_overrides={"m": 0}), dict(torch_dtype="int4")])
def test_bad_config_values_name_the_key(values) -> None:
    with pytest.raises(ConfigError, match=next(iter(values))):
        EngineConfig(**values)


def test_factory_builds_the_chosen_engine_unloaded() -> None:
    engine = create_engine(default_info(), EngineConfig(llama_n_threads=1))   # no pool: a CPU machine
    assert engine.kind == "llamacpp" and engine.memory().weights_bytes == 0
    assert engine_class("llamacpp") is type(engine)


def test_reporter_is_monotonic_deduplicated_and_survives_a_broken_listener() -> None:
    seen: list[LoadProgress] = []
    reporter = ProgressReporter("m", seen.append)
    for fraction, stage in ((0.0, "reading"), (0.001, "reading"), (0.5, "reading"), (0.4, "reading"),
                            (0.95, "allocating"), (1.0, "ready")):
        reporter.report(fraction, stage)
    assert [(e.fraction, e.stage) for e in seen] == [(0.0, "reading"), (0.5, "reading"),
                                                     (0.95, "allocating"), (1.0, "ready")]

    def broken(_event: LoadProgress) -> None:
        raise RuntimeError("listener bug")

    ProgressReporter("m", broken).report(0.5, "reading")   # logged, not raised


def test_config_from_the_app_settings() -> None:
    from app.settings import ModelSettings, Settings
    from engines.config import config_from_settings

    settings = Settings(model_dirs=("/models",), scan_ollama=False, max_queue=3,
                        models={"a": ModelSettings(engine="llamacpp", context_length=1024), "b": ModelSettings()})
    config = config_from_settings(settings, llama_n_threads=2)
    assert config.model_dirs == ("/models",) and not config.scan_ollama and config.max_queue == 3
    assert config.engine_overrides == {"a": "llamacpp"} and config.context_overrides == {"a": 1024}
    assert config.llama_n_threads == 2


def test_roots_follow_the_tools_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "o"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "h"))
    config = EngineConfig()
    assert config.resolved_ollama_dirs() == (tmp_path / "o",)
    assert config.resolved_hf_cache_dir() == tmp_path / "h" / "hub"
    assert EngineConfig(ollama_dir=str(tmp_path / "x")).resolved_ollama_dirs() == (tmp_path / "x",)
    assert config.resolved_models_dir().name == "models"
