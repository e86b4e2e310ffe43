"""RemoteEngine's edges against a server on loopback that misbehaves on purpose: a remote that
stops answering times out, one that refuses or errors maps to a typed error, and the settings'
remotes become RemoteConfigs. (The whole path against a real second daemon:
tests/app/test_remote_engine.py.)"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engines.base import ModelInfo
from engines.config import EngineConfig, config_from_settings
from engines.errors import EngineBusy, ModelNotFound
from engines.remote.config import RemoteConfig
from engines.remote.engine import RemoteEngine
from engines.remote.errors import RemoteUnavailable
from engines.registry import ModelRegistry
from engines.remote.listing import RemoteCatalog
from engines.types import ChatMessage, GenerateRequest, RequestKind, SamplingParams
from kvcached.errors import ConfigError


LISTED = ["slow", "busy"]  # what GET /v1/models answers; a test adds a model


class _Remote(BaseHTTPRequestHandler):
    """GET /v1/models lists LISTED; POST stalls (slow) or answers 503 (busy) or 404."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json(200, {"data": [{"id": name} for name in LISTED]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] == "slow":
            time.sleep(3)  # longer than the engine's timeout: the client has gone by now
            return
        self._json(503 if body["model"] == "busy" else 404, {"error": {"message": "no"}})


@pytest.fixture(scope="module")
def remote():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Remote)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield RemoteConfig("lab", f"http://127.0.0.1:{server.server_address[1]}", timeout_s=0.5)
    server.shutdown()
    server.server_close()


def _engine(remote: RemoteConfig, model: str) -> RemoteEngine:
    (info,) = [i for i in RemoteCatalog((remote,)).infos() if i.metadata["remote_model"] == model]
    assert info.name == f"lab/{model}" and info.source == "remote"
    engine = RemoteEngine(info, EngineConfig(remotes=(remote,)))
    engine.load()
    return engine


def _chat() -> GenerateRequest:
    return GenerateRequest(RequestKind.CHAT, SamplingParams(max_tokens=4), messages=(ChatMessage("user", "Hi"),))


def test_a_remote_that_stops_answering_times_out(remote: RemoteConfig) -> None:
    engine = _engine(remote, "slow")
    with pytest.raises(RemoteUnavailable, match="timed out"):
        list(engine.generate(_chat()))
    assert not engine.busy  # the request is over, not stuck


def test_remote_statuses_map_to_typed_errors(remote: RemoteConfig) -> None:
    with pytest.raises(EngineBusy, match="503"):
        list(_engine(remote, "busy").generate(_chat()))
    gone = RemoteEngine(ModelInfo("lab/x", "", source="remote", metadata={"remote": "lab", "remote_model": "x"}),
                        EngineConfig(remotes=(remote,)))
    with pytest.raises(ModelNotFound, match="404"):
        list(gone.generate(_chat()))
    closed = RemoteConfig("off", "http://127.0.0.1:9", connect_timeout_s=1)  # the discard port: refused
    assert RemoteCatalog((closed,)).infos() == []  # not listed, no error
    engine = RemoteEngine(ModelInfo("off/x", "", source="remote", metadata={"remote": "off", "remote_model": "x"}),
                          EngineConfig(remotes=(closed,)))
    with pytest.raises(RemoteUnavailable, match="went away"):
        list(engine.generate(_chat()))


def test_a_remote_model_added_later_is_listed_without_a_restart(remote: RemoteConfig) -> None:
    often = dataclasses.replace(remote, list_every_s=0.1)
    registry = ModelRegistry(EngineConfig(remotes=(often,), include_bundled=False, scan_ollama=False,
                                          scan_lmstudio=False, scan_hf_cache=False, models_dir="/nonexistent"))
    assert [m.name for m in registry.list()] == ["lab/slow", "lab/busy"]
    LISTED.append("new")
    try:
        deadline = time.monotonic() + 10
        while "lab/new" not in [m.name for m in registry.list()] and time.monotonic() < deadline:
            time.sleep(0.05)  # each read past the period refreshes the list in the background
        assert registry.get("lab/new").metadata["remote_model"] == "new"
    finally:
        LISTED.remove("new")


def test_remote_settings_become_configs() -> None:
    from app.settings import RemoteSettings, Settings

    settings = Settings(remotes={"lan": RemoteSettings(url="http://box:11434", kind="ollama", api_key="k")})
    (remote,) = config_from_settings(settings).remotes
    assert (remote.name, remote.kind, remote.model_prefix, remote.headers()) == (
        "lan", "ollama", "lan/", {"Authorization": "Bearer k"})
    with pytest.raises(ConfigError):
        RemoteConfig("x", "ftp://box")
