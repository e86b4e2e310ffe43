"""Pull progress: Ollama's status lines, the adapter huggingface_hub reports bytes through,
and the CLI's bar.

Ollama's /api/pull streams {"status": "pulling manifest"}, then per file
{"status": "pulling <digest[:12]>", "digest": "sha256:...", "total": N, "completed": M},
then "verifying sha256 digest" and "success"; the `ollama` library reads exactly
these fields (ProgressResponse). huggingface_hub reports a download through a
tqdm-like object (`tqdm_class`): ByteCounter is one, which forwards the counts
and raises PullCancelled on the next chunk once the pull is cancelled (the
library then removes its temporary file).
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

from app.pull.errors import PullCancelled

REPORT_EVERY_S = 0.1  # byte counts are passed on at most this often (and always at the end)


@dataclass(frozen=True)
class PullProgress:
    status: str
    digest: str | None = None     # "sha256:<hex>" of the file being pulled
    total: int | None = None
    completed: int | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


ProgressSink = Callable[[PullProgress], None]


def bar_factory(status: str, digest: str | None, sink: ProgressSink, cancel: threading.Event):
    """A tqdm_class for hf_hub_download: each instance reports one file's bytes to sink."""

    class ByteCounter:
        def __init__(self, *, total: int | None = None, initial: int = 0, **_: object) -> None:
            self.total, self.n = total, initial
            self._reported_at = 0.0

        def update(self, n: int = 1) -> None:
            if cancel.is_set():
                raise PullCancelled("the pull was cancelled")
            self.n += n
            now = time.monotonic()
            if now - self._reported_at >= REPORT_EVERY_S or (self.total is not None and self.n >= self.total):
                self._reported_at = now
                sink(PullProgress(status, digest, self.total, self.n))

        def close(self) -> None:
            pass

        def __enter__(self) -> "ByteCounter":
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    return ByteCounter


class PullBar:
    """The CLI's view of a pull: a bar per file on a terminal, status lines elsewhere."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._status = ""

    def render(self, p: PullProgress) -> str:
        if not p.total:
            return p.status
        fraction = min(1.0, (p.completed or 0) / p.total)
        filled = int(round(fraction * self.width))
        return (f"{p.status} [{'#' * filled}{'-' * (self.width - filled)}] {fraction * 100:5.1f}% "
                f"{(p.completed or 0) / 1e6:,.1f}/{p.total / 1e6:,.1f} MB")

    def __call__(self, p: PullProgress) -> None:
        done_file = bool(p.total) and (p.completed or 0) >= (p.total or 0)
        if self.is_tty and p.total:
            self.stream.write("\r" + self.render(p) + ("\n" if done_file else ""))
        elif p.status != self._status or done_file:
            self.stream.write(self.render(p) + "\n")  # a log gets one line per step, not a \r storm
        self._status = p.status
        self.stream.flush()
