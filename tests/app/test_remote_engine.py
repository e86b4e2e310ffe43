"""The remote engine against a real second server on loopback: a second Ebbtide daemon,
reached through its OpenAI API and its Ollama API, its models listed under a prefix beside
the local ones (the API, the dashboard), answers streamed through; the remote going away
mid-stream ends that stream with a clear error and the daemon keeps serving.

The two daemons are shared by the module's tests (starting them is most of the cost);
the test that kills the remote runs last."""
from __future__ import annotations

import signal
import stat

import httpx
import ollama
import openai
import pytest
import tomli_w

from desktop_support import LiveDaemon
from test_dashboard_live import page  # noqa: F401  (the Chromium page fixture)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    remote = LiveDaemon(tmp_path_factory.mktemp("remote") / "home").start()
    local = LiveDaemon(tmp_path_factory.mktemp("local") / "home")
    remotes = {"lan": {"url": remote.url, "kind": "openai", "prefix": "lan/", "api_key": "sk-remote-secret"},
               "box": {"url": f"{remote.url}/", "kind": "ollama", "timeout_s": 60}}
    settings = local.home / "config" / "settings.toml"
    settings.write_text(settings.read_text() + tomli_w.dumps({"remotes": remotes}))
    settings.chmod(0o644)  # the daemon makes it private: it holds an API key
    local.start()
    yield local, remote
    local.stop()
    remote.stop()


def _http(daemon: LiveDaemon) -> httpx.Client:
    return httpx.Client(base_url=daemon.url, timeout=120, trust_env=False)


def _default_model(daemon: LiveDaemon) -> str:
    with _http(daemon) as http:  # not the control client: its 10 s limit is short on a loaded machine
        return next(m["name"] for m in http.get("/api/tags").json()["models"] if ":" in m["name"])


def test_remote_models_are_listed_and_answer(pair) -> None:
    local, remote = pair
    name = _default_model(remote)
    settings = local.home / "config" / "settings.toml"
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600  # it holds an API key
    with _http(local) as http:
        tags = {m["name"] for m in http.get("/api/tags").json()["models"]}
        assert {name, f"lan/{name}", f"box/{name}"} <= tags  # beside the local model
        token = (local.home / "run" / "control-token").read_text().strip()
        rows = {m["name"]: m for m in http.get("/control/models", headers={"Authorization": f"Bearer {token}"})
                .json()["models"]}
    assert rows[f"lan/{name}"]["source"] == "remote" and rows[f"lan/{name}"]["route"]["engine"] == "remote"
    assert rows[f"lan/{name}"]["remote"] == "lan" and rows[name]["remote"] is None

    client = openai.OpenAI(base_url=f"{local.url}/v1", api_key="x", http_client=httpx.Client(trust_env=False))
    stream = client.chat.completions.create(model=f"lan/{name}", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    direct = openai.OpenAI(base_url=f"{remote.url}/v1", api_key="x", http_client=httpx.Client(trust_env=False))
    expected = direct.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0)
    assert text and text == expected.choices[0].message.content  # greedy: the same answer, proxied

    answer = ollama.Client(host=local.url, trust_env=False).chat(
        model=f"box/{name}", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 8, "temperature": 0})
    assert answer.message.content == text and answer.eval_count
    with _http(local) as http:
        ps = {m["name"]: m for m in http.get("/api/ps").json()["models"]}
    assert ps[f"lan/{name}"]["engine"] == "remote" and ps[f"lan/{name}"]["size_vram"] == 0


def test_dashboard_marks_remote_models(pair, page) -> None:  # noqa: F811
    local, remote = pair
    name = _default_model(remote)
    page.goto(local.client.dashboard_url())
    row = page.locator(f'#models tr[data-model="box/{name}"]')
    row.wait_for(timeout=20_000)
    assert "remote: box" in row.inner_text()
    assert "remote" not in page.locator(f'#models tr[data-model="{name}"]').inner_text()


def test_remote_going_away_mid_stream(pair) -> None:
    local, remote = pair
    name = _default_model(remote)
    body = {"model": f"lan/{name}", "prompt": "Count: 1, 2, 3, 4, 5, 6, 7,", "max_tokens": 400,
            "temperature": 0, "stream": True}
    lines: list[str] = []
    with _http(local) as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(line)
            if len([x for x in lines if x.startswith("data:")]) == 2:
                remote.proc.send_signal(signal.SIGKILL)  # the remote dies mid-answer
    errors = [x for x in lines if '"error"' in x]
    assert errors and "lan" in errors[-1] and "went away" in errors[-1]
    with _http(local) as http:
        assert http.get("/health").status_code == 200  # no crash
        again = http.post("/v1/chat/completions", json={"model": f"lan/{name}",
                                                         "messages": [{"role": "user", "content": "Hi"}]})
        assert again.status_code == 502 and "lan" in again.json()["error"]["message"]
        local_answer = http.post("/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert local_answer.status_code == 200  # the local model is unaffected
    assert local.proc.poll() is None

