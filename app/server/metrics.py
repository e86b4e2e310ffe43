"""Prometheus metrics in the plain text exposition format, with no extra dependency.

What is counted: HTTP requests by route and status, request latency and
time-to-first-token histograms, prompt and completion tokens per model,
memory held per model (read when scraped), and reclaim events with the bytes
they gave back. Counting is a dict update under one lock: cheap enough for the
per-token path, which only counts at the end of a request anyway.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from starlette.routing import Match

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: Labels) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f"{name}_bucket{_labels(labels + (('le', repr(bound)),))} {running}")
        out.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {self.n}")
        out.append(f"{name}_sum{_labels(labels)} {self.total}")
        out.append(f"{name}_count{_labels(labels)} {self.n}")
        return out


class Metrics:
    """The daemon's counters. Gauges of memory are read from a callback at scrape time."""

    HELP = {
        "ebbtide_http_requests_total": ("counter", "HTTP requests by route and status"),
        "ebbtide_http_request_duration_seconds": ("histogram", "HTTP request latency"),
        "ebbtide_time_to_first_token_seconds": ("histogram", "Time to the first generated token"),
        "ebbtide_prompt_tokens_total": ("counter", "Prompt tokens processed"),
        "ebbtide_completion_tokens_total": ("counter", "Tokens generated"),
        "ebbtide_reclaim_events_total": ("counter", "Memory reclaim steps taken"),
        "ebbtide_reclaimed_bytes_total": ("counter", "Bytes given back by reclaim steps"),
        "ebbtide_model_memory_bytes": ("gauge", "Memory a loaded model holds, by kind"),
        "ebbtide_uptime_seconds": ("gauge", "Seconds since the daemon started"),
    }

    def __init__(self, memory: Callable[[], dict[str, dict[str, int]]] | None = None) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._histograms: dict[str, dict[Labels, Histogram]] = defaultdict(dict)
        self._memory = memory
        self._started = time.monotonic()

    def inc(self, name: str, labels: Labels = (), value: float = 1.0) -> None:
        with self._lock:
            self._counters[name][labels] += value

    def observe(self, name: str, labels: Labels, value: float) -> None:
        with self._lock:
            hist = self._histograms[name].get(labels)
            if hist is None:
                hist = self._histograms[name][labels] = Histogram(LATENCY_BUCKETS)
            hist.observe(value)

    def record_generation(self, model: str, prompt_tokens: int, completion_tokens: int,
                          ttft_s: float | None) -> None:
        labels = (("model", model),)
        self.inc("ebbtide_prompt_tokens_total", labels, prompt_tokens)
        self.inc("ebbtide_completion_tokens_total", labels, completion_tokens)
        if ttft_s is not None:
            self.observe("ebbtide_time_to_first_token_seconds", labels, ttft_s)

    def record_reclaim(self, step: str, client: str, bytes_returned: int) -> None:
        labels = (("step", step), ("model", client))
        self.inc("ebbtide_reclaim_events_total", labels)
        self.inc("ebbtide_reclaimed_bytes_total", labels, bytes_returned)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = {n: dict(v) for n, v in self._counters.items()}
            hists = {n: dict(v) for n, v in self._histograms.items()}
        for name, (kind, text) in self.HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for labels, value in sorted(counters.get(name, {}).items()):
                lines.append(f"{name}{_labels(labels)} {value:g}")
            for labels, hist in sorted(hists.get(name, {}).items()):
                lines += hist.lines(name, labels)
            if name == "ebbtide_model_memory_bytes" and self._memory is not None:
                for model, kinds in sorted(self._memory().items()):
                    for kind_name, value in sorted(kinds.items()):
                        lines.append(f"{name}{_labels((('model', model), ('kind', kind_name)))} {value}")
            if name == "ebbtide_uptime_seconds":
                lines.append(f"{name} {time.monotonic() - self._started:.3f}")
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Counts requests by route template (not raw path: unbounded label values) and status."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = _route_of(scope)
            self.metrics.inc("ebbtide_http_requests_total", (("route", route), ("status", str(status))))
            self.metrics.observe("ebbtide_http_request_duration_seconds", (("route", route),),
                                 time.perf_counter() - started)


def _route_of(scope) -> str:
    route = scope.get("route")  # FastAPI records the matched route here
    if route is not None and hasattr(route, "path"):
        return route.path
    app = scope.get("app")
    router = getattr(app, "router", None)
    for route in getattr(router, "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return getattr(route, "path", "other")
    return "unmatched"
