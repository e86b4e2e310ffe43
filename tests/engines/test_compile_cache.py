"""engines.compile_cache: compiled kernels under Ebbtide's cache dir, keyed by the stack.

The real check compiles with torch.compile (Inductor's CPU backend) in two fresh
processes: the first writes the cache under our folder, the second, same key,
loads its graph from there instead of compiling again."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines import compile_cache
from engines.compile_cache import INDUCTOR_ENV, TRITON_ENV, StackKey

ROOT = Path(__file__).resolve().parents[2]
KEY = StackKey(torch="2.13.0", triton="3.9.0", driver="none", gpu="cpu")


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(INDUCTOR_ENV, raising=False)
    monkeypatch.delenv(TRITON_ENV, raising=False)


def test_caches_point_under_the_keyed_folder(tmp_path, clean_env) -> None:
    folder = compile_cache.use(tmp_path, KEY)
    assert folder == tmp_path / "compile" / KEY.digest()
    assert os.environ[INDUCTOR_ENV] == str(folder / "inductor")
    assert os.environ[TRITON_ENV] == str(folder / "triton")
    assert "2.13.0" in (folder / "key.txt").read_text()


def test_a_stack_change_invalidates_the_old_kernels(tmp_path, clean_env, monkeypatch) -> None:
    old = compile_cache.use(tmp_path, KEY)
    (old / "inductor").mkdir()
    (old / "inductor" / "artifact").write_text("compiled for the old driver")
    monkeypatch.delenv(INDUCTOR_ENV)
    monkeypatch.delenv(TRITON_ENV)
    new = compile_cache.use(tmp_path, StackKey(KEY.torch, KEY.triton, driver="580.1", gpu="NVIDIA H200"))
    assert new != old and not old.exists()
    assert os.environ[INDUCTOR_ENV] == str(new / "inductor")
    for field in ("torch", "triton", "driver", "gpu"):   # every part of the key changes the folder
        changed = StackKey(**{**KEY.__dict__, field: "other"})
        assert changed.digest() != KEY.digest()


def test_a_cache_dir_the_user_set_is_kept(tmp_path, clean_env, monkeypatch) -> None:
    monkeypatch.setenv(INDUCTOR_ENV, str(tmp_path / "mine"))
    compile_cache.use(tmp_path / "ebbtide", KEY)
    assert os.environ[INDUCTOR_ENV] == str(tmp_path / "mine")


def test_the_current_key_reads_versions_without_importing_torch() -> None:
    code = ("import sys, json; from engines.compile_cache import current_key; k = current_key(); "
            "print(json.dumps([k.torch, 'torch' in sys.modules, 'triton' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    version, torch_imported, triton_imported = json.loads(out.stdout)
    assert version.startswith("2.") and not torch_imported and not triton_imported


COMPILE_ONCE = """
import json, sys
from pathlib import Path
from engines import compile_cache
compile_cache.use(Path(sys.argv[1]))
import torch
from torch._dynamo.utils import counters
f = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1)
f(torch.randn(64))
print(json.dumps(dict(counters["inductor"])))
"""


@pytest.mark.slow
def test_a_second_process_reuses_the_compiled_graph(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (INDUCTOR_ENV, TRITON_ENV)}

    def compile_in_fresh_process() -> dict:
        out = subprocess.run([sys.executable, "-c", COMPILE_ONCE, str(tmp_path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = compile_in_fresh_process()
    folders = list((tmp_path / "compile").iterdir())
    assert len(folders) == 1 and any((folders[0] / "inductor").rglob("*")), "nothing cached under our folder"
    assert first.get("fxgraph_cache_miss", 0) >= 1
    second = compile_in_fresh_process()
    assert second.get("fxgraph_cache_hit", 0) >= 1 and second.get("fxgraph_cache_miss", 0) == 0
