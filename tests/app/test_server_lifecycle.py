"""The daemon's lifecycle: lazy loading, idle unload after keep_alive, SIGTERM exits 0,
a non-loopback bind needs the explicit setting."""
from __future__ import annotations

import json
import threading
import time

from app.daemon import EXIT_CONFIG, check_bind, serve
from app.settings import Settings


def test_non_loopback_bind_needs_the_setting() -> None:
    assert check_bind(Settings(host="127.0.0.1")) is None
    assert check_bind(Settings(host="localhost")) is None
    assert "allow_non_loopback" in check_bind(Settings(host="0.0.0.0"))
    assert check_bind(Settings(host="0.0.0.0", allow_non_loopback=True)) is None
    assert serve(Settings(host="0.0.0.0")) == EXIT_CONFIG


def test_models_load_lazily_and_unload_after_keep_alive(start_daemon) -> None:
    daemon = start_daemon('keep_alive = "1s"\n')
    with daemon.client() as http:
        assert http.get("/api/ps").json()["models"] == []  # nothing loads at start
        model = daemon.default_model()
        http.post("/api/generate", json={"model": model, "prompt": "", "keep_alive": "1h"})
        running = http.get("/api/ps").json()["models"]
        assert [m["name"] for m in running] == [model]
        # Ebbtide's own keys: what of the size is the weights (a quantized file's blocks) and the KV.
        assert running[0]["weights_bytes"] > 0 and running[0]["weights_bytes"] + running[0]["kv_bytes"] == running[0]["size"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and http.get("/api/ps").json()["models"]:
            time.sleep(0.2)
        # The user's 1 s wins over the client's 1 h.
        assert http.get("/api/ps").json()["models"] == []


def test_sigterm_with_a_stream_in_flight_exits_zero(start_daemon) -> None:
    daemon = start_daemon()
    model = daemon.default_model()
    got_first = threading.Event()
    lines: list[dict] = []

    def stream() -> None:
        body = {"model": model, "prompt": "Count to one thousand:", "options": {"num_predict": 4000}}
        try:
            with daemon.client() as http, http.stream("POST", "/api/generate", json=body) as response:
                for line in response.iter_lines():
                    lines.append(json.loads(line))
                    got_first.set()
        except Exception:  # the daemon closing the connection is an acceptable end
            pass
        got_first.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    assert got_first.wait(90) and lines
    assert daemon.stop(timeout_s=60) == 0
    thread.join(30)
    assert not thread.is_alive()
    log = daemon.log()
    assert "Traceback" not in log, log[-3000:]


def test_off_loopback_mode_needs_the_token_everywhere_and_cors_follows_settings(start_daemon) -> None:
    # Bound on loopback here, but with the off-loopback policy the setting turns on.
    daemon = start_daemon('allow_non_loopback = true\nallowed_origins = ["http://localhost:5173"]\n')
    with daemon.client() as http:
        assert http.get("/health").status_code == 200  # probes stay open
        assert http.get("/api/tags").status_code == 401
        assert http.get("/api/tags", headers=daemon.auth).status_code == 200
        # Host is not checked off loopback (the machine's LAN name is legitimate), the token is.
        assert http.get("/api/tags", headers={**daemon.auth, "Host": "studio.lan"}).status_code == 200
        preflight = http.options("/v1/chat/completions", headers={
            "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"})
        assert preflight.headers.get("access-control-allow-origin") == "http://localhost:5173"
        refused = http.options("/v1/chat/completions", headers={
            "Origin": "http://localhost:9999", "Access-Control-Request-Method": "POST"})
        assert refused.status_code == 403
