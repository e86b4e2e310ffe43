"""Numbers for people: byte counts and model memory as the CLI, tray and dashboard show them."""
from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(count: float) -> str:
    """1536 -> "1.5 KiB"; binary units, as GPU memory is counted."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def model_held_bytes(model: dict) -> int:
    """What a model holds in memory now: weights plus mapped KV (a /control/models entry)."""
    return model_weights_bytes(model) + int((model.get("memory") or {}).get("kv_held", 0) or 0)


def model_weights_bytes(model: dict) -> int:
    """Of it, the weights (quantized GGUFs: their blocks, about the file's tensor bytes)."""
    return int((model.get("memory") or {}).get("weights", 0) or 0)
