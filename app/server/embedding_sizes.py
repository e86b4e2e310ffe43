"""Shorter embeddings on request (OpenAI and Ollama `dimensions`).

As OpenAI's text-embedding-3 models do: keep the first `dimensions` values
and L2-normalize again (Matryoshka truncation). Asking for more dimensions
than the model has is a 400.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from app.server.errors import BadRequest


def shorten(vector: Sequence[float], dimensions: int | None) -> list[float]:
    if dimensions is None or dimensions == len(vector):
        return list(vector)
    if dimensions > len(vector):
        raise BadRequest(f"dimensions: {dimensions} is more than this model's {len(vector)}")
    head = list(vector[:dimensions])
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]
