"""Safe by default: Host (DNS rebinding), Origin, body size, bad input, the control token."""
from __future__ import annotations

import os
import stat

import pytest

from app.server.ollama_format import parse_keep_alive
from app.server.errors import BadRequest
from app.server.security import SecurityPolicy, is_loopback_host


@pytest.mark.parametrize("host, ok", [
    ("127.0.0.1", True), ("127.0.0.1:11480", True), ("localhost:8", True), ("[::1]:80", True), ("::1", True),
    ("127.8.9.10", True), ("LOCALHOST", True), ("app.localhost", True),
    ("evil.example", False), ("evil.example:11480", False), ("10.0.0.1", False), ("0.0.0.0", False),
    ("127.0.0.1.evil.example", False), ("", False),
])
def test_loopback_hosts(host, ok) -> None:
    assert is_loopback_host(host) is ok


def test_origin_policy() -> None:
    policy = SecurityPolicy(port=11480, token="t" * 43, allowed_origins=("http://localhost:5173",))
    assert policy.origin_allowed(None)                         # programs send no Origin
    assert policy.origin_allowed("http://127.0.0.1:11480")     # the dashboard's own page
    assert policy.origin_allowed("http://localhost:5173")      # configured
    assert not policy.origin_allowed("http://localhost:3000")  # another local page
    assert not policy.origin_allowed("https://evil.example")
    assert not policy.origin_allowed("null")
    assert not policy.origin_allowed("chrome-extension://abcdef")  # a browser extension: not by default
    for shell in ("app://obsidian.md", "file://", "tauri://localhost", "vscode-webview://1a2b3c"):
        assert policy.origin_allowed(shell), shell                # Ollama's defaults for editors and shells
    narrowed = SecurityPolicy(port=11480, token="t" * 43, allowed_origins=("http://localhost:*",))
    assert narrowed.origin_allowed("http://localhost:3000") and not narrowed.origin_allowed("http://evil:3000")


@pytest.mark.parametrize("value, seconds", [
    ("5m", 300), ("1h30m", 5400), ("300ms", 0.3), ("-1", -1), (-1, -1), (0, 0), ("10", 10), (2.5, 2.5), (None, None),
])
def test_keep_alive_parsing(value, seconds) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m", True, "1h-5m"])
def test_bad_keep_alive_is_a_typed_error(value) -> None:
    with pytest.raises(BadRequest):
        parse_keep_alive(value)


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.client() as client:
        yield client


def test_dns_rebinding_host_is_refused(http) -> None:
    response = http.get("/api/tags", headers={"Host": "evil.example"})
    assert response.status_code == 403
    assert "loopback" in response.json()["error"]
    assert http.get("/api/tags", headers={"Host": "localhost"}).status_code == 200


def test_foreign_browser_origin_is_refused(live_server, http) -> None:
    refused = http.post("/v1/chat/completions", headers={"Origin": "https://evil.example"},
                        json={"model": "x", "messages": [{"role": "user", "content": "x"}]})
    assert refused.status_code == 403
    own = http.get("/api/version", headers={"Origin": f"http://127.0.0.1:{live_server.port}"})
    assert own.status_code == 200


def test_body_over_the_limit_is_413(http) -> None:
    response = http.post("/api/generate", content=b"{" + b" " * (9 << 20) + b"}",
                         headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_chunked_body_over_the_limit_is_413(http) -> None:
    def chunks():
        for _ in range(10):
            yield b" " * (1 << 20)

    response = http.post("/api/generate", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("path, body, status", [
    ("/api/generate", b"{not json", 400),
    ("/v1/chat/completions", b"[]", 400),
    ("/v1/chat/completions", b'{"model": 5, "messages": "hi"}', 400),
    ("/api/chat", b'{"model": "x", "messages": [{"role": 7}]}', 400),
    ("/completion", b'{"prompt": {"a": 1}}', 400),
    ("/tokenize", b'{"content": 12}', 400),
    ("/v1/chat/completions", b'{"model": "", "messages": [{"role": "wizard", "content": "x"}]}', 400),
    ("/v1/chat/completions", b'{"model": "", "messages": [{"role": "user", "content": "x"}], "temperature": -3}', 400),
])
def test_malformed_input_is_4xx_never_5xx(http, path, body, status) -> None:
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text


def test_curl_form_content_type_is_read_as_json(live_server, http) -> None:
    # `curl -d '{...}'` sends application/x-www-form-urlencoded; Ollama reads JSON anyway.
    response = http.post("/api/show", content=b'{"model": "%s"}' % live_server.default_model().encode(),
                         headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200


def test_no_path_reaches_files_outside_the_assets(http) -> None:
    for path in ("/assets/../app/settings.py", "/assets/%2e%2e/%2e%2e/etc/passwd", "/assets/..%2fpyproject.toml"):
        response = http.get(path)
        assert response.status_code in (400, 404), path
        assert "DEFAULT_PORT" not in response.text and "root:" not in response.text


def test_control_api_needs_the_token(live_server, http) -> None:
    assert http.get("/control/status").status_code == 401
    assert http.get("/control/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = http.get("/control/status", headers=live_server.auth)
    assert ok.status_code == 200 and ok.json()["pid"] > 0


def test_token_file_is_private(live_server) -> None:
    mode = stat.S_IMODE(os.stat(live_server.home / "run" / "control-token").st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(live_server.home / "run").st_mode) == 0o700


def test_dashboard_trades_the_url_token_for_a_cookie(live_server) -> None:
    with live_server.client(follow_redirects=False) as http:
        assert http.get("/dashboard?token=wrong").status_code == 401
        response = http.get(f"/dashboard?token={live_server.token}")
        assert response.status_code == 303 and response.headers["location"] == "/dashboard"
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        # The client now holds the cookie: the control API answers without a header.
        assert http.get("/control/status").status_code == 200


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd",
                                  "C:\\Windows\\win.ini"])
def test_model_names_never_become_paths(http, name) -> None:
    # The registry looks names up in its listing only; a path-like name is just an unknown model.
    shown = http.post("/api/show", json={"model": name})
    assert shown.status_code == 404 and "root:" not in shown.text
    generated = http.post("/api/generate", json={"model": name, "prompt": "x", "stream": False})
    assert generated.status_code == 404
