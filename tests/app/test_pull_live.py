"""/api/pull, /api/copy and /api/delete on a real daemon through the real `ollama` client, the
hub on loopback (hub_server.py) serving the bundled SmolLM2; and `ebbtide pull` with its bar."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import ollama
import pytest

from engines.registry.bundled import bundled_path
from hub_server import BUNDLED_FILE as FILE
from hub_server import SLOW_REPO, Hub, hub_for_daemons


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    # The daemon (started after this) and huggingface_hub in it read the hub from the environment.
    server, hub = hub_for_daemons(monkeypatch, tmp_path / "hf-cache")
    yield hub
    server.shutdown()
    server.server_close()


def test_ollama_client_pulls_copies_and_deletes(hub: Hub, start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon("scan_hf_cache = true")
    client = ollama.Client(host=daemon.url, trust_env=False)
    steps = list(client.pull("hf.co/smol/SmolLM2-GGUF:Q4_1", stream=True))
    assert steps[0].status == "pulling manifest" and steps[-1].status == "success"
    size = bundled_path().stat().st_size
    byte_steps = [s for s in steps if s.total]
    assert byte_steps and all(s.total == size and s.digest.startswith("sha256:") for s in byte_steps)
    completed = [s.completed for s in byte_steps]
    assert completed == sorted(completed) and completed[-1] == size
    names = {m.model for m in client.list().models}
    assert "hf.co/smol/SmolLM2-GGUF:SmolLM2-135M-Instruct-Q4_1" in names
    answer = client.chat(model="hf.co/smol/SmolLM2-GGUF:Q4_1", messages=[{"role": "user", "content": "Hi"}],
                         options={"num_predict": 4, "temperature": 0})
    assert answer.message.content.strip()

    client.copy("hf.co/smol/SmolLM2-GGUF:Q4_1", "team/smol")
    link = daemon.home / "data" / "models" / "team" / "smol.gguf"
    assert link.is_symlink() and "team/smol" in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as refused:
        client.delete("hf.co/smol/SmolLM2-GGUF:Q4_1")  # the HF cache is shared with other tools
    assert refused.value.status_code == 403
    assert client.delete("team/smol").status == "success"
    assert not link.exists() and not (daemon.home / "data" / "models" / "team").exists()
    assert any((tmp_path / "hf-cache").rglob("*.gguf"))  # the pulled file is still there
    with pytest.raises(ollama.ResponseError) as bad:
        client.pull("llama3.2")
    assert bad.value.status_code == 400 and "Hugging Face" in str(bad.value)


def test_a_client_that_hangs_up_cancels_the_pull(hub: Hub, start_daemon, tmp_path: Path) -> None:
    import httpx

    daemon = start_daemon("scan_hf_cache = true")
    cache = tmp_path / "hf-cache"

    def files(match) -> list[Path]:
        return [p for p in cache.rglob("*") if p.is_file() and match(p)]

    with httpx.Client(base_url=daemon.url, timeout=60, trust_env=False) as http:
        with http.stream("POST", "/api/pull", json={"model": f"hf.co/{SLOW_REPO}"}) as response:
            for line in response.iter_lines():
                if '"completed"' in line:
                    break  # bytes are flowing (over a 5 s link): hang up
        step = json.loads(line)
        assert 0 < step["completed"] < step["total"]  # the download was under way
        deadline = time.monotonic() + 30
        while files(lambda p: p.name.endswith(".incomplete")) and time.monotonic() < deadline:
            time.sleep(0.1)
        # It stopped without finishing: no partial file, no blob, nothing listed.
        assert files(lambda p: p.name.endswith(".incomplete") or "blobs" in p.parts or "snapshots" in p.parts) == []
        assert not any(SLOW_REPO in m["name"] for m in http.get("/api/tags").json()["models"])
    assert len(hub.gets(FILE)) == 1  # one GET, abandoned: the pull was not retried behind our back


def test_cli_pull_without_a_daemon(hub: Hub, tmp_path: Path) -> None:
    from desktop_support import ROOT, daemon_env, free_port

    env = daemon_env(tmp_path / "home", free_port())
    done = subprocess.run([sys.executable, "-m", "app.cli", "pull", "smol/SmolLM2-GGUF"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "100.0%" in done.stderr and "success" in done.stderr and "Pulled smol/SmolLM2-GGUF." in done.stdout
    assert list((tmp_path / "hf-cache").glob("models--smol--SmolLM2-GGUF/snapshots/*/" + FILE))
    missing = subprocess.run([sys.executable, "-m", "app.cli", "pull", "smol/Nothing-GGUF"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 5 and "no Hugging Face repo" in missing.stderr
