"""Models in Ollama's store, named as `ollama list` shows them.

The store (~/.ollama/models, or $OLLAMA_MODELS) holds manifests at
manifests/<host>/<namespace>/<model>/<tag>, JSON listing layers by digest, and
the layers themselves at blobs/sha256-<hex>. The layer whose mediaType is
application/vnd.ollama.image.model is the GGUF file. Names drop the default
host and the "library" namespace: registry.ollama.ai/library/smollm2/135m is
"smollm2:135m"; other namespaces and hosts stay ("hf.co/org/repo:Q4_K_M").
Read-only; a digest that is not a plain sha256 is never turned into a path.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from engines.registry.found import Found, resolve_inside

log = logging.getLogger(__name__)

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
PARAMS_MEDIA_TYPE = "application/vnd.ollama.image.params"
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
MAX_MANIFEST_BYTES = 1 << 20


def display_name(host: str, namespace: str, model: str, tag: str) -> str:
    """Ollama's short form of a manifest path."""
    if host == DEFAULT_HOST:
        prefix = "" if namespace == DEFAULT_NAMESPACE else f"{namespace}/"
    else:
        prefix = f"{host}/{namespace}/"
    return f"{prefix}{model}:{tag}"


def _model_digest(manifest: dict) -> str | None:
    for layer in manifest.get("layers") or []:
        if isinstance(layer, dict) and layer.get("mediaType") == MODEL_MEDIA_TYPE:
            match = _DIGEST.match(str(layer.get("digest", "")))
            return match.group(1) if match else None
    return None


def _read_manifest(path: Path) -> dict | None:
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.debug("skipping Ollama manifest %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def scan_ollama(root: Path) -> list[Found]:
    """Every model in an Ollama store whose model layer is on disk."""
    manifests = root / "manifests"
    if not manifests.is_dir():
        return []
    found = []
    # The fixed depth host/namespace/model/tag is the store's layout.
    for manifest_path in sorted(manifests.glob("*/*/*/*")):
        if not manifest_path.is_file():
            continue
        host, namespace, model, tag = manifest_path.relative_to(manifests).parts
        manifest = _read_manifest(manifest_path)
        digest = _model_digest(manifest) if manifest else None
        if digest is None:
            continue
        blob = resolve_inside(root / "blobs" / f"sha256-{digest}", root)
        if blob is None:
            log.debug("Ollama model %s/%s:%s has no blob on disk", namespace, model, tag)
            continue
        found.append(Found(name=display_name(host, namespace, model, tag), path=str(blob),
                           source="ollama", digest=digest))
    return found


def scan_ollama_roots(roots: list[Path]) -> list[Found]:
    found: list[Found] = []
    for root in roots:
        found.extend(scan_ollama(root))
    return found
