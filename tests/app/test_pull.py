"""Pulling models: the real huggingface_hub against a hub on loopback (hub_server.py) serving the
bundled SmolLM2 GGUF: a dropped connection resumes, a wrong checksum leaves no file, a full disk
is refused before a byte moves, a cancel leaves no partial file; quant choice and names."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from app.pull.choose import RepoFile, choose_files
from app.pull.errors import BadModelName, ChecksumMismatch, NotEnoughDisk, NothingToPull, PullCancelled
from app.pull.hub import PullConfig, pull
from app.pull.names import PullRef, parse_pull_name
from app.pull.progress import PullProgress
from engines.config import EngineConfig
from engines.registry import ModelRegistry
from engines.registry.bundled import bundled_path
from hub_server import Hub, HubFile, start_hub

FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf() -> bytes:
    return bundled_path().read_bytes()  # the bundled SmolLM2 (bundled_model_path without torch)


@pytest.fixture
def hub(gguf: bytes, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    server, hub = start_hub(Hub(repos={
        "smol/Plain-GGUF": {FILE: HubFile(gguf), "README.md": HubFile(b"# SmolLM2\n")},
        "smol/Dropped-GGUF": {FILE: HubFile(gguf, drop_after=len(gguf) // 3)},
        "smol/Corrupt-GGUF": {FILE: HubFile(gguf, corrupt=True)},
        "smol/Huge-GGUF": {"Huge-Q8_0.gguf": HubFile(b"GGUF", listed_size=1 << 60)},
    }))
    yield hub
    server.shutdown()
    server.server_close()


def _pull(hub: Hub, cache: Path, name: str, **kwargs) -> tuple[object, list[PullProgress]]:
    seen: list[PullProgress] = []
    result = pull(parse_pull_name(name), PullConfig(cache, endpoint=hub.url), seen.append, **kwargs)
    return result, seen


def _model_files(cache: Path) -> list[Path]:
    """Blobs, snapshot entries and partial downloads: what a broken pull could leave (refs and
    lock files are huggingface_hub's bookkeeping, not models)."""
    return [p for p in cache.rglob("*") if (p.is_file() or p.is_symlink()) and
            ("blobs" in p.parts or "snapshots" in p.parts or p.name.endswith(".incomplete"))]


def test_dropped_connection_resumes_with_range(hub: Hub, gguf: bytes, tmp_path: Path) -> None:
    result, seen = _pull(hub, tmp_path, "hf.co/smol/Dropped-GGUF:Q4_1")
    (path,) = result.files
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(gguf).hexdigest()
    whole, resumed = hub.gets(FILE)  # the second GET resumed from what the first had written
    assert whole is None and 0 < int(resumed.removeprefix("bytes=").rstrip("-")) <= len(gguf) // 3
    byte_steps = [p for p in seen if p.total]
    assert byte_steps[-1].completed == byte_steps[-1].total == len(gguf)
    assert [p.status for p in seen][-2:] == ["verifying sha256 digest", "success"]
    # In the HF cache, as other tools lay it out, and listed under the name it was pulled as.
    assert path.is_symlink() and path.resolve().name == hashlib.sha256(gguf).hexdigest()
    registry = ModelRegistry(EngineConfig(hf_cache_dir=str(tmp_path), include_bundled=False, scan_ollama=False,
                                          scan_lmstudio=False, models_dir=str(tmp_path / "own")))
    assert registry.get("hf.co/smol/Dropped-GGUF:Q4_1").name == "hf.co/smol/Dropped-GGUF:SmolLM2-135M-Instruct-Q4_1"


def test_wrong_checksum_leaves_no_file(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(ChecksumMismatch, match="removed"):
        _pull(hub, tmp_path, "smol/Corrupt-GGUF")
    assert hub.gets(FILE) == [None]  # it was downloaded whole, then refused
    assert _model_files(tmp_path) == []


def test_full_disk_is_refused_before_downloading(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(NotEnoughDisk, match="GB free"):
        _pull(hub, tmp_path, "hf.co/smol/Huge-GGUF:Q8_0")
    assert not any("/resolve/" in path for _, path, _ in hub.requests)


def test_cancel_leaves_no_partial_file(hub: Hub, tmp_path: Path) -> None:
    cancel = threading.Event()
    seen: list[PullProgress] = []

    def sink(p: PullProgress) -> None:
        seen.append(p)
        if p.completed:
            cancel.set()  # cancel once bytes flow: the next chunk stops it

    with pytest.raises(PullCancelled):
        pull(parse_pull_name("smol/Plain-GGUF"), PullConfig(tmp_path, endpoint=hub.url), sink, cancel)
    assert _model_files(tmp_path) == []


def test_unknown_repo_and_quant(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(NothingToPull, match="no Hugging Face repo"):
        _pull(hub, tmp_path, "smol/Missing-GGUF")
    with pytest.raises(NothingToPull, match="Q4_1"):  # names the quants there are
        _pull(hub, tmp_path, "smol/Plain-GGUF:Q6_K")


def test_pull_names() -> None:
    assert parse_pull_name("hf.co/bartowski/Qwen-GGUF:Q4_K_M") == PullRef("bartowski/Qwen-GGUF", "Q4_K_M")
    assert parse_pull_name("huggingface.co/a/b") == PullRef("a/b", None)
    assert parse_pull_name("lmstudio-community/Qwen-GGUF:latest") == PullRef("lmstudio-community/Qwen-GGUF", None)
    assert PullRef("a/b", "Q8_0").name == "hf.co/a/b:Q8_0"
    for bad in ("llama3.2", "a/b/c", "../x/y", "a/b:bad tag"):
        with pytest.raises(BadModelName):
            parse_pull_name(bad)


def _files_named(*names: str, sizes: dict[str, int] | None = None) -> list[RepoFile]:
    return [RepoFile(n, (sizes or {}).get(n, 100), None) for n in names]


def test_choose_by_quant_tag() -> None:
    files = _files_named("m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-Q8_0.gguf", "mmproj-m-f16.gguf", "README.md")
    assert [f.path for f in choose_files(files, "q8_0", "r")] == ["m-Q8_0.gguf"]
    assert [f.path for f in choose_files(files, None, "r")] == ["m-Q4_K_M.gguf"]  # Ollama's default
    with pytest.raises(NothingToPull, match="2 files"):
        choose_files(files, "Q4_K", "r")  # ambiguous: Q4_K_M or Q4_K_S
    with pytest.raises(NothingToPull, match="no GGUF"):
        choose_files(_files_named("mmproj-m-f16.gguf", "README.md"), None, "r")
    only = _files_named("a-IQ2_XS.gguf", "b-IQ3_M.gguf", sizes={"a-IQ2_XS.gguf": 5, "b-IQ3_M.gguf": 9})
    assert [f.path for f in choose_files(only, None, "r")] == ["a-IQ2_XS.gguf"]  # no default quant: the smallest


def test_choose_brings_every_part_of_a_split_model() -> None:
    files = _files_named("Q8_0/m-Q8_0-00002-of-00002.gguf", "Q8_0/m-Q8_0-00001-of-00002.gguf", "m-Q4_0.gguf")
    assert [f.path for f in choose_files(files, "Q8_0", "r")] == [
        "Q8_0/m-Q8_0-00001-of-00002.gguf", "Q8_0/m-Q8_0-00002-of-00002.gguf"]
