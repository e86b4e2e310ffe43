"""Client sampling values -> engines.types.SamplingParams, checked at the edge.

Every dialect names the same knobs differently (max_tokens, n_predict,
num_predict...); the routes rename, this module validates, so a bad value is
a 400 naming the field instead of an assertion deep inside an engine.
"""
from __future__ import annotations

from engines.types import FinishReason, SamplingParams

from app.server.errors import BadRequest

# "Generate until the model stops or the context is full": the generation caps it
# at the model's context length once the model is known.
UNBOUNDED = 1 << 30
MAX_STOPS = 16

FINISH_NAMES = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "stop", None: "stop"}


def normalize_stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    stops = tuple(s for s in stops if s)
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}")
    return stops


def make_sampling(*, max_tokens: int | None, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, min_p: float | None = None, seed: int | None = None,
                  stop: str | list[str] | None = None, repeat_penalty: float | None = None,
                  presence_penalty: float | None = None, frequency_penalty: float | None = None,
                  repeat_last_n: int | None = None) -> SamplingParams:
    """SamplingParams from what a client sent; None keeps the default. Raises BadRequest."""
    open_ended = max_tokens is None or max_tokens < 0
    values: dict[str, object] = {"max_tokens": UNBOUNDED if open_ended else max_tokens,
                                 "open_ended": open_ended, "stop": normalize_stop(stop)}
    checks = {
        "temperature": (temperature, lambda v: v >= 0, "must be >= 0"),
        "top_p": (top_p, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        "top_k": (top_k, lambda v: v >= 0, "must be >= 0"),
        "min_p": (min_p, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        "repeat_penalty": (repeat_penalty, lambda v: v >= 0, "must be >= 0"),
        "presence_penalty": (presence_penalty, lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
        "frequency_penalty": (frequency_penalty, lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
        "repeat_last_n": (repeat_last_n, lambda v: v >= -1, "must be >= -1"),
    }
    for name, (value, ok, why) in checks.items():
        if value is None:
            continue
        if value != value or not ok(value):  # value != value: NaN
            raise BadRequest(f"{name}: {value!r} {why}")
        values[name] = value
    if values.get("top_p") == 0:
        values["top_p"] = 1e-6  # top_p 0 means "only the likeliest token": as close as (0, 1] allows
    if seed is not None and seed >= 0:  # a negative seed means "random" in llama.cpp and Ollama
        values["seed"] = int(seed) & 0xFFFFFFFF  # llama.cpp seeds are 32-bit
    if values.get("repeat_last_n") == -1:
        values.pop("repeat_last_n")
    return SamplingParams(**values)
