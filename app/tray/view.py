"""What the tray shows, computed from the control API's answers (no drawing, no pystray).

A TrayView is immutable and made whole on each refresh, so the icon, tooltip
and menu always agree with each other.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from app.human import format_bytes, model_held_bytes, model_weights_bytes

YIELD_SHOWN_S = 5.0  # how long the icon keeps its "giving back" look after a reclaim


class TrayMode(enum.Enum):
    STARTING = "starting"   # the daemon is not answering yet
    NORMAL = "normal"
    YIELDING = "yielding"   # memory was just given back to other applications
    PAUSED = "paused"       # every model in memory is paused
    ERROR = "error"         # the daemon failed and is not restarted any more


@dataclass(frozen=True)
class ModelRow:
    name: str
    state: str          # loaded | loading | paused | unloaded
    busy: bool
    held_bytes: int
    engine: str = ""
    remote: str = ""    # the remote server that serves it ([remotes.NAME]); "" for a local model
    rung: str = ""      # the broker's ladder: loaded | kv_on_host | weights_on_host | unloaded
    weights_bytes: int = 0  # of held_bytes, the weights (the rest is KV)

    @property
    def shown_state(self) -> str:
        """The words a person reads: a loaded model that serves nothing is idle; a paused one
        says whether its weights left the GPU too."""
        if self.state == "loaded":
            return "busy" if self.busy else "idle"
        if self.rung == "weights_on_host":
            return "paused, off the GPU"
        return self.state

    def held_words(self) -> str:
        """'1.3 GB (weights 1.1 GB)': what a quantized file costs on the card is the first
        thing a person on an 8-16 GB GPU asks."""
        held = format_bytes(self.held_bytes)
        return f"{held} (weights {format_bytes(self.weights_bytes)})" if self.weights_bytes else held


@dataclass(frozen=True)
class TrayView:
    mode: TrayMode = TrayMode.STARTING
    models: tuple[ModelRow, ...] = ()
    device_total: int = 0
    device_free: int = 0
    others_bytes: int = 0          # held by other applications
    auto_yield: bool = True
    start_at_login: bool = False
    endpoint: str = ""
    message: str = ""              # the last error, or why the daemon is down
    made_at: float = field(default_factory=time.time)

    @property
    def held_bytes(self) -> int:
        return sum(m.held_bytes for m in self.models)

    @property
    def held_fraction(self) -> float:
        return min(1.0, self.held_bytes / self.device_total) if self.device_total else 0.0

    @property
    def others_fraction(self) -> float:
        return min(1.0, self.others_bytes / self.device_total) if self.device_total else 0.0

    def tooltip(self) -> str:
        if self.mode in (TrayMode.STARTING, TrayMode.ERROR):
            return f"Ebbtide: {self.mode.value}" + (f" - {self.message}" if self.message else "")
        in_memory = [m for m in self.models if m.state != "unloaded"]
        lines = [f"Ebbtide: models hold {format_bytes(self.held_bytes)}"
                 + (f" of {format_bytes(self.device_total)}" if self.device_total else "")]
        if self.device_total:
            lines.append(f"Others use {format_bytes(self.others_bytes)}, {format_bytes(self.device_free)} free")
        lines += [f"{m.name}: {m.shown_state}, {m.held_words()}" for m in in_memory[:4]]
        if self.mode is TrayMode.YIELDING:
            lines.append("Giving memory back to other apps")
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)[:250]  # Windows cuts tooltips at 128-255 characters


def device_figures(memory: dict) -> tuple[int, int, int]:
    """(total, free, others) from /control/memory's device sample (kvcached's monitor keys)."""
    device = memory.get("device") or {}
    if not isinstance(device, dict):
        return 0, 0, 0
    return tuple(int(device.get(f"{key}_bytes", device.get(key, 0)) or 0)  # type: ignore[return-value]
                 for key in ("total", "free", "others"))


def view_from(models: list[dict], memory: dict, *, last_reclaim_at: float = 0.0,
              start_at_login: bool = False, endpoint: str = "", now: float | None = None) -> TrayView:
    """The view for a daemon that answered: /control/models and /control/memory bodies."""
    now = time.time() if now is None else now
    rows = tuple(ModelRow(str(m.get("name", "?")), str(m.get("state", "unloaded")), bool(m.get("busy")),
                          model_held_bytes(m), str(m.get("engine") or ""), str(m.get("remote") or ""),
                          str(m.get("rung") or ""), model_weights_bytes(m))
                 for m in models)
    in_memory = [r for r in rows if r.state not in ("unloaded",)]
    mode = TrayMode.NORMAL
    if in_memory and all(r.state == "paused" for r in in_memory):
        mode = TrayMode.PAUSED
    if now - last_reclaim_at < YIELD_SHOWN_S:
        mode = TrayMode.YIELDING
    total, free, others = device_figures(memory)
    return TrayView(mode=mode, models=rows, device_total=total, device_free=free, others_bytes=others,
                    auto_yield=bool(memory.get("auto_yield", True)), start_at_login=start_at_login,
                    endpoint=endpoint, made_at=now)


def down_view(mode: TrayMode, message: str, *, start_at_login: bool = False, endpoint: str = "") -> TrayView:
    """The view while the daemon does not answer (starting, or failed for good)."""
    return TrayView(mode=mode, message=message, start_at_login=start_at_login, endpoint=endpoint)
