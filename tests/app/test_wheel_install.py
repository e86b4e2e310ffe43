"""A real install: the wheel built from this checkout, installed into a fresh venv outside
the clone, `ebbtide serve` started from that venv, a chat answer and the dashboard page.

Offline and cheap on the shared machine: the wheel is built once per session with
`pip wheel --no-build-isolation` (setuptools from the test venv, no download), and the
fresh venv gets only the wheel (`--no-deps`) plus a .pth line naming the test venv's
site-packages, so torch, llama-cpp-python and the bundled model are not installed again.
A .pth path line only appends that folder to sys.path (the .pth files inside it, the
editable install's finder among them, are not run), so `app` comes from the wheel.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from desktop_support import free_port

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "app", "engines", "kvcached")
START_TIMEOUT_S = 120.0

pytestmark = pytest.mark.slow


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the checkout (a build writes build/ and egg-info beside its sources)."""
    src = tmp_path_factory.mktemp("wheel-src")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(src)], check=True, timeout=600)
    (built,) = out.glob("ebbtide-*.whl")
    return built


@pytest.fixture(scope="session")
def installed(wheel: Path, tmp_path_factory) -> Path:
    """A fresh venv with the wheel in it; returns the venv's folder."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    (_site_packages(python) / "zz-ebbtide-test-deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_holds_the_assets(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("app/assets/dashboard/index.html", "app/assets/dashboard/dashboard.js",
                 "app/assets/icons/ebbtide-256.png", "app/assets/linux/ebbtide.desktop",
                 "app/assets/linux/ebbtide.service", "engines/registry/registry.py", "kvcached/broker/broker.py"):
        assert name in names, name


def test_installed_ebbtide_serves_chat_and_dashboard(installed: Path, tmp_path: Path) -> None:
    python = installed / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import app, engines; print(app.__file__); print(engines.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where), where  # not the clone's packages
    home, port = tmp_path / "home", free_port()
    (home / "config").mkdir(parents=True)
    (home / "config" / "settings.toml").write_text(
        "scan_ollama = false\nscan_lmstudio = false\nscan_hf_cache = false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBBTIDE_") and k != "PYTHONPATH"}
    env.update({"EBBTIDE_HOME": str(home), "EBBTIDE_BACKEND": "host", "NO_PROXY": "127.0.0.1"})
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(installed / "bin" / "ebbtide"), "serve", "--port", str(port)], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_health(proc, url, log_path)
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
            answer = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0})
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"].strip()
            token = (home / "run" / "control-token").read_text().strip()
            page = http.get(f"/dashboard?token={token}", follow_redirects=True)
            assert page.status_code == 200 and "<html" in page.text.lower() and "dashboard.js" in page.text
            script = http.get("/assets/dashboard/dashboard.js")
            icon = http.get("/assets/icons/ebbtide-64.png")
            assert script.status_code == 200 and icon.content[:4] == b"\x89PNG"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log_path.read_text()[-3000:]


def _wait_for_health(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ebbtide serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"ebbtide serve did not answer in {START_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-3000:]}")
