"""The registry finds the real default GGUF in an Ollama store, an HF cache, an LM Studio
folder and a plain models folder built in tmp dirs, names each as its tool does, and
never changes a file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engines.errors import ModelNotFound
from engines.registry import ModelRegistry
from llamacpp_support import default_gguf, default_sha256, isolated_config, link_or_copy

SHA = "sha256"


def build_ollama_store(root: Path, model: str = "smollm2", tag: str = "135m",
                       namespace: str = "library", host: str = "registry.ollama.ai") -> str:
    digest = default_sha256()
    link_or_copy(default_gguf(), root / "blobs" / f"sha256-{digest}")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": "sha256:" + "0" * 64, "size": 10},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
             "size": default_gguf().stat().st_size},
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64, "size": 5},
        ],
    }
    path = root / "manifests" / host / namespace / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return digest


def build_hf_cache(root: Path, org: str = "HuggingFaceTB", name: str = "SmolLM2-135M-Instruct-GGUF") -> Path:
    repo = root / f"models--{org}--{name}"
    digest = default_sha256()
    link_or_copy(default_gguf(), repo / "blobs" / digest)
    revision = "a" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "smollm2-135m-instruct-q4_1.gguf").symlink_to(f"../../blobs/{digest}")
    (snapshot / "README.md").write_text("not a model")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo


def _tree_state(root: Path) -> dict[str, tuple]:
    return {str(p): (p.is_symlink(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_finds_the_model_in_ollama_and_hf_layouts(tmp_path: Path) -> None:
    digest = build_ollama_store(tmp_path / "ollama")
    build_ollama_store(tmp_path / "ollama", model="coder", tag="latest", namespace="someone")
    build_hf_cache(tmp_path / "hf")
    before = _tree_state(tmp_path)
    registry = ModelRegistry(isolated_config(tmp_path, include_bundled=False))
    models = {m.name: m for m in registry.list()}
    assert set(models) == {"smollm2:135m", "someone/coder:latest",
                           "hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smollm2-135m-instruct-q4_1"}
    ollama = models["smollm2:135m"]
    assert (ollama.source, ollama.digest, ollama.family, ollama.quantization) == ("ollama", digest, "llama", "Q4_1")
    assert ollama.context_length == 8192 and not ollama.can_infill
    assert ollama.size_bytes == default_gguf().stat().st_size
    hf = models["hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smollm2-135m-instruct-q4_1"]
    assert hf.source == "hf" and hf.digest == digest
    assert Path(hf.path).parent.name == "blobs"          # the symlink was resolved to its blob
    assert registry.get("someone/coder").name == "someone/coder:latest"   # ":latest" implied
    assert _tree_state(tmp_path) == before                # read-only: nothing moved or touched


def test_lmstudio_and_plain_folders(tmp_path: Path) -> None:
    repo = tmp_path / "lmstudio" / "lmstudio-community" / "SmolLM2-GGUF"
    link_or_copy(default_gguf(), repo / "SmolLM2-Q4_1.gguf")
    link_or_copy(default_gguf(), repo / "mmproj-SmolLM2-f16.gguf")       # a vision projector, not a model
    link_or_copy(default_gguf(), tmp_path / "ebbtide-models" / "team" / "small.gguf")
    link_or_copy(default_gguf(), tmp_path / "extra" / "split-00001-of-00002.gguf")
    (tmp_path / "extra" / "split-00002-of-00002.gguf").write_bytes(b"second shard")
    registry = ModelRegistry(isolated_config(tmp_path, include_bundled=False, model_dirs=(str(tmp_path / "extra"),)))
    names = {m.name: m.source for m in registry.list()}
    assert names == {"lmstudio-community/SmolLM2-GGUF/SmolLM2-Q4_1.gguf": "lmstudio",
                     "team/small": "folder", "split-00001-of-00002": "folder"}


def test_links_out_of_a_store_and_bad_manifests_are_skipped(tmp_path: Path) -> None:
    outside = tmp_path / "outside.gguf"
    link_or_copy(default_gguf(), outside)
    digest = "f" * 64
    (tmp_path / "ollama" / "blobs").mkdir(parents=True)
    (tmp_path / "ollama" / "blobs" / f"sha256-{digest}").symlink_to(outside)
    for name, body in {"escape": {"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": f"sha256:{digest}"}]},
                       "traversal": {"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                 "digest": "sha256:../../../outside.gguf"}]},
                       "garbage": None}.items():
        path = tmp_path / "ollama" / "manifests" / "registry.ollama.ai" / "library" / name / "latest"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(body) if body else "{not json")
    repo = tmp_path / "hf" / "models--org--name" / "snapshots" / "rev"
    repo.mkdir(parents=True)
    (repo / "model.gguf").symlink_to(outside)
    (tmp_path / "ebbtide-models").mkdir()
    (tmp_path / "ebbtide-models" / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    registry = ModelRegistry(isolated_config(tmp_path, include_bundled=False))
    assert registry.list() == []


def test_unknown_name_names_the_nearest(tmp_path: Path) -> None:
    build_ollama_store(tmp_path / "ollama")
    registry = ModelRegistry(isolated_config(tmp_path, include_bundled=False))
    with pytest.raises(ModelNotFound) as err:
        registry.get("smolm2:135m")
    assert err.value.near == ("smollm2:135m",)
    with pytest.raises(ModelNotFound):
        registry.get("../../etc/passwd")


def test_refresh_sees_new_and_removed_models(tmp_path: Path) -> None:
    registry = ModelRegistry(isolated_config(tmp_path, include_bundled=False), rescan_after_miss_s=0)
    assert registry.list() == []
    link_or_copy(default_gguf(), tmp_path / "ebbtide-models" / "fresh.gguf")
    assert registry.get("fresh").source == "folder"     # a miss rescans once
    os.unlink(tmp_path / "ebbtide-models" / "fresh.gguf")
    assert registry.refresh() == []


def test_bundled_default_model_is_found() -> None:
    registry = ModelRegistry(isolated_config(Path("/nonexistent-ebbtide")))
    default = registry.get("default")
    assert default.source == "bundled" and default.name == "smollm2:135m-instruct-q4_1"
    assert registry.get("smollm2") == default and registry.default() == default


def test_synthetic_models_only_when_turned_on(tmp_path: Path) -> None:
    assert ModelRegistry(isolated_config(tmp_path, include_bundled=False)).list() == []
    with pytest.raises(ModelNotFound):
        ModelRegistry(isolated_config(tmp_path, include_bundled=False)).get("synthetic/llama-3.1-8b")
    registry = ModelRegistry(isolated_config(tmp_path, include_bundled=False, include_synthetic=True))
    names = {m.name for m in registry.list()}
    assert names and all(n.startswith("synthetic/") for n in names)
    some = sorted(names)[0].split(":")[0]
    info = registry.get(f"{some}:zz")      # any copy tag resolves
    assert info.source == "synthetic" and info.path == ""
    with pytest.raises(ModelNotFound):
        registry.get("synthetic/no-such-config")
