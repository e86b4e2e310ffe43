"""Writing benchmark results: JSON under benchmarks/results/ (or $OUT on the lent GPU),
always naming the device, and a short table printed for the reader."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    """The accelerator's name where torch sees one, else the CPU's model name."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # torch missing or broken: still name the CPU
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + platform.processor()


def write_result(name: str, payload: dict) -> Path:
    """Write NAME.json with device and time stamped in; returns the path.
    On the lent GPU, $OUT is where files come back from, so write there too."""
    record = {
        "benchmark": name,
        "device": device_name(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **payload,
    }
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(text)
    return path


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """A plain aligned table on stdout (benchmarks are CLI programs)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
