"""Ollama's wire details shared by its routes: timestamps, Go durations, model details.

Zed parses /api/tags strictly (every field of details must be there, of the
right type) and Ollama clients read created_at/expires_at as RFC 3339, so
these shapes are kept in one place.
"""
from __future__ import annotations

import datetime as dt
import math
import re

from app.server.errors import BadRequest
from engines.base import ModelInfo

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
FOREVER_YEAR = 2318  # what Ollama shows as expires_at for keep_alive -1


def rfc3339(unix_time: float) -> str:
    if math.isinf(unix_time):
        return dt.datetime(FOREVER_YEAR, 1, 1, tzinfo=dt.timezone.utc).isoformat().replace("+00:00", "Z")
    stamp = dt.datetime.fromtimestamp(unix_time, dt.timezone.utc)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def now_rfc3339() -> str:
    import time

    return rfc3339(time.time())


def parse_keep_alive(value: str | float | int | None) -> float | None:
    """Seconds from Ollama's keep_alive: a number of seconds, or a Go duration ("5m", "1h30m",
    "-1m"); negative means forever. None when the client sent none."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("keep_alive: expected a duration such as \"5m\" or a number of seconds")
    if isinstance(value, (int, float)):
        if value != value:
            raise BadRequest("keep_alive: NaN is not a duration")
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _GO_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise BadRequest(f"keep_alive: {value!r} is not a duration such as \"5m\", \"1h30m\" or -1")
    return sign * sum(float(n) * _GO_UNITS[u] for n, u in parts)


def parameter_size(count: int) -> str:
    """"135M", "8.0B" as Ollama writes it."""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{round(count / 1e6)}M"
    return str(count)


def details(info: ModelInfo) -> dict:
    return {"parent_model": "", "format": "gguf", "family": info.family, "families": [info.family],
            "parameter_size": parameter_size(info.parameter_count), "quantization_level": info.quantization}


def digest(info: ModelInfo) -> str:
    """The file's sha256 where known (Ollama blobs); otherwise a stable stand-in from its path,
    size and time, since hashing a multi-GB file on every /api/tags would be slow."""
    if info.digest:
        return info.digest.removeprefix("sha256:").removeprefix("sha256-")
    import hashlib

    return hashlib.sha256(f"{info.path}:{info.size_bytes}:{info.modified_at}".encode()).hexdigest()


def tag_entry(info: ModelInfo) -> dict:
    return {"name": info.name, "model": info.name, "modified_at": rfc3339(info.modified_at),
            "size": info.size_bytes, "digest": digest(info), "details": details(info)}
