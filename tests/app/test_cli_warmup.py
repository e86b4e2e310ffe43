"""`ebbtide warmup`: the real CLI loads the model once (compiled kernels cached) and unloads it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = "smollm2:135m-instruct-q4_1"


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    (home / "config").mkdir(parents=True, exist_ok=True)
    settings = {"scan_ollama": False, "scan_lmstudio": False, "scan_hf_cache": False, "backend": "host",
                "models": {BUNDLED: {"engine": "torch"}}}
    (home / "config" / "settings.toml").write_text(tomli_w.dumps(settings))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EBBTIDE_")}
    environ.update({"EBBTIDE_HOME": str(home), "PYTHONPATH": str(ROOT)})
    return subprocess.run([sys.executable, "-m", "app.cli", "warmup", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)


def test_warmup_loads_the_default_model_once_and_says_what_it_did(tmp_path) -> None:
    done = run_cli(tmp_path, BUNDLED)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiles nothing on this device" in done.stdout    # the CPU: no torch.compile, no graphs
    assert "read " in done.stdout and "ready" in done.stderr   # its phases, and the progress bar
    assert len(list((tmp_path / "cache" / "compile").glob("*/key.txt"))) == 1


def test_warmup_of_an_unknown_model_names_the_way_out(tmp_path) -> None:
    done = run_cli(tmp_path, "no-such-model")
    assert done.returncode != 0 and "no model named 'no-such-model'" in done.stderr
    assert "ebbtide models" in done.stderr
