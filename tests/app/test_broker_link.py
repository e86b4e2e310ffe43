"""The daemon's broker link hands each registered engine its broker handle, so the
torch engine admits requests against the budget; settings carry the admission wait and the CPU numerics choice."""
from __future__ import annotations

from pathlib import Path

from app.models.broker_link import BrokerLink
from app.settings import ModelSettings, Settings
from app.settings_file import load_settings
from engines.base import ModelInfo
from engines.config import config_from_settings
from engines.torch.model.configs import named_config
from engines.torch.engine import TorchEngine
from kvcached.broker import Broker
from kvcached.config import KvcachedConfig
from kvcached.standalone import standalone_pool

TINY = named_config("smollm2-135m").replace(num_layers=1, dim=64, num_heads=2, num_kv_heads=1, head_dim=32,
                                           ffn_dim=128, vocab_size=300, max_context=64)


def test_registered_engines_admit_through_the_broker_and_stop_when_unregistered():
    engine = TorchEngine(ModelInfo(name="tiny", path="", source="synthetic", metadata={"config": TINY}),
                         config_from_settings(Settings(admission_timeout_s=7.5), torch_num_slots=2),
                         standalone_pool(KvcachedConfig(page_size=64 << 10, reserve_pages=0)))
    engine.load()
    broker = Broker(KvcachedConfig(headroom_bytes=0, budget_bytes=1 << 40))
    link = BrokerLink(broker)
    try:
        link.register("tiny", engine, ModelSettings(max_bytes=1 << 30))
        assert engine.budget.handle is not None and engine.budget.timeout_s == 7.5
        assert broker.snapshot()["clients"][0]["max_bytes"] == 1 << 30
        link.unregister("tiny", engine)
        assert engine.budget.handle is None and broker.clients() == []
    finally:
        link.close()
        engine.unload()


def test_admission_timeout_is_a_setting(tmp_path: Path):
    path = tmp_path / "settings.toml"
    path.write_text('admission_timeout_s = "2m"\n')
    loaded = load_settings(path, environ={})
    assert not loaded.problems and loaded.settings.admission_timeout_s == 120.0
    path.write_text("admission_timeout_s = 0\n")
    loaded = load_settings(path, environ={})
    assert loaded.problems and loaded.settings.admission_timeout_s == Settings().admission_timeout_s


def test_cpu_numerics_is_a_setting_that_reaches_the_engine_config(tmp_path: Path):
    path = tmp_path / "settings.toml"
    path.write_text("torch_llamacpp_numerics = false\n")
    loaded = load_settings(path, environ={})
    assert not loaded.problems and config_from_settings(loaded.settings).torch_llamacpp_numerics is False
    path.write_text('torch_llamacpp_numerics = "sometimes"\n')
    loaded = load_settings(path, environ={})
    assert [p.key for p in loaded.problems] == ["torch_llamacpp_numerics"]
    assert config_from_settings(loaded.settings).torch_llamacpp_numerics is True


def test_a_model_a_request_holds_is_busy_to_the_broker_and_a_load_waits_for_it():
    """A load that needs the memory of a model a request has just leased (loaded for it, the
    request not yet submitted) waits instead of unloading it, and then names it."""
    from kvcached.errors import AdmissionDenied

    def tiny(name: str) -> TorchEngine:
        return TorchEngine(ModelInfo(name=name, path="", source="synthetic", metadata={"config": TINY},
                                     parameter_count=TINY.num_params),
                           config_from_settings(Settings(), torch_num_slots=2),
                           standalone_pool(KvcachedConfig(page_size=64 << 10, reserve_pages=0)))

    held, wanted = tiny("held"), tiny("wanted")
    budget = held.load_estimate() + wanted.load_estimate() // 2      # one of them, not both
    link = BrokerLink(Broker(KvcachedConfig(headroom_bytes=0, budget_bytes=budget)))
    leased = {"held"}
    link.in_use = lambda name: name in leased
    try:
        link.load("held", held, None)
        try:
            link.load("wanted", wanted, None, wait_s=0.3)
            raise AssertionError("the load took a leased model's memory")
        except AdmissionDenied as exc:
            assert "in the way: held" in str(exc) and "busy" in str(exc)
        assert held.state.value == "loaded" and wanted.state.value == "unloaded"
        leased.clear()                                   # the request ended: now it may go
        link.load("wanted", wanted, None)
        assert held.state.value == "unloaded" and wanted.state.value == "loaded"
    finally:
        link.close()
        held.unload()
        wanted.unload()


def test_the_hub_hears_of_weights_to_host_and_of_an_unload_for_the_host():
    from app.models.events import EventHub
    from engines.config import EngineConfig

    engine = TorchEngine(ModelInfo(name="tiny", path="", source="synthetic", metadata={"config": TINY}),
                         EngineConfig(torch_num_slots=2, torch_weights_to_host=True),
                         standalone_pool(KvcachedConfig(page_size=64 << 10, reserve_pages=0)))
    engine.load()
    hub = EventHub()
    link = BrokerLink(Broker(KvcachedConfig(headroom_bytes=0, host_low_bytes=0)), hub)
    try:
        link.register("tiny", engine, None)
        verbs = link._clients["tiny"][2]
        assert verbs.weights_to_host() > 0
        assert verbs.relieve_host() > 0            # its weights wait in host memory: it unloads
        events = [(e.data["state"], e.data.get("rung")) for e in hub.recent() if e.kind == "model"]
        assert events == [("paused", "weights_on_host"), ("unloaded", None)]
    finally:
        link.close()
        engine.unload()
