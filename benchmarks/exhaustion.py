"""The daemon when another process takes the device's memory (issue 15): no hang,
no 500, everything an unload took comes back.

    PYTHONPATH=. python3 -m benchmarks.exhaustion [--backend cuda|host] [--cycles 10]

A daemon serves two models (synthetic SmolLM2-135M shapes on the torch engine)
at its default settings. Each cycle, benchmarks/memory_hog.py takes the device
down to `--free-target` free (150 MiB on the GPU) and holds it `--hold-s`
seconds (20) while requests keep arriving for one model (the busy one); the
other is idle, and the two swap roles every cycle. Each cycle starts with a
request to each model (loading both); after the hog lets go, both get a request
(each must succeed, within 5 s on the GPU), then both are unloaded through the
control API and the daemon's own memory (NVML for this process on the GPU; what
the broker counts on the host) is read. Every request is recorded: status, Retry-After, a stream reset, latency.

Judged (the issue's "done when"): 0 hangs (a request past `--request-timeout-s`),
every request 200 or 503 with Retry-After, 0 HTTP 500, 0 resets, every request
after the pressure 200, the daemon's memory after each unload within 64 MiB of
its level before the first load, and no growth over the cycles.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import httpx

from app.control_client import ControlError
from benchmarks import e2e_common as common
from benchmarks.daemon_proc import REPO, running
from benchmarks.results_io import print_table, write_result
from benchmarks.video_call import mem_available, parse_size

log = logging.getLogger("exhaustion")
MiB = 1 << 20
GiB = 1 << 30
MEMORY_SLACK = 64 * MiB        # after an unload, within this of the level before the first load
AFTER_LIMIT_S = {"cuda": 5.0, "host": 60.0}   # a request after the pressure succeeds this fast
LOAD_S = 600.0                 # a request that loads its model may take this much longer


@dataclass
class Record:
    cycle: int
    phase: str                  # "during" | "after"
    model: str
    status: int | None = None   # HTTP status; None: no answer (reset or hang)
    retry_after: str | None = None
    reset: bool = False         # the connection broke, before or inside the stream
    hang: bool = False          # no end within the request timeout
    latency_s: float = 0.0
    error: str = ""


def send(base_url: str, model: str, timeout_s: float, record: Record) -> Record:
    """One streamed completion of a few tokens; fills record."""
    body = {"model": model, "prompt": "The tide goes out and", "max_tokens": 8, "stream": True,
            "temperature": 0}
    start = time.monotonic()
    try:
        with httpx.Client(timeout=timeout_s, trust_env=False) as client, \
                client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            record.status = response.status_code
            record.retry_after = response.headers.get("retry-after")
            text = "".join(response.iter_text())
            if response.status_code == 200 and "[DONE]" not in text:
                record.reset, record.error = True, "stream ended without [DONE]"
            elif response.status_code != 200:
                record.error = text[:300]
    except httpx.TimeoutException as exc:
        record.hang, record.error = True, f"{type(exc).__name__}: {exc}"
    except httpx.TransportError as exc:       # reset, refused, broken stream
        record.reset, record.error = True, f"{type(exc).__name__}: {exc}"
    record.latency_s = round(time.monotonic() - start, 3)
    return record


class Hog:
    """benchmarks/memory_hog.py as a child process, followed line by line."""

    def __init__(self, backend: str, free_target: int, hold_s: float, max_take: int) -> None:
        cmd = [sys.executable, "-m", "benchmarks.memory_hog", "--backend", backend,
               "--free-target", str(free_target), "--hold-s", str(hold_s), "--max-take", str(max_take)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        self.held = self.free_at_hold = 0

    def wait_held(self, timeout_s: float = 120.0) -> None:
        words = self._line(timeout_s)
        if not words or words[0] != "HELD":
            raise RuntimeError(f"memory_hog did not reach its target: {words}")
        self.held, self.free_at_hold = int(words[1]), int(words[2])

    def wait_released(self, timeout_s: float) -> None:
        self._line(timeout_s)
        self.proc.wait(timeout_s)

    def _line(self, timeout_s: float) -> list[str]:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        return out[0].split() if out else []

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def daemon_memory(daemon) -> int:
    """What the daemon holds by the broker's monitor (NVML for this process on the GPU)."""
    memory = daemon.control_get("/control/memory") or {}
    return int((memory.get("device") or {}).get("ours_bytes") or 0)


def pool_memory(daemon) -> int:
    """Of that, the page pool's pages (in use and reserve): what an unload leaves in the pool."""
    memory = daemon.control_get("/control/memory") or {}
    return int((memory.get("broker") or {}).get("pool_held_bytes") or 0)


def run_cycle(daemon, cycle: int, models: list[str], args, records: list[Record]) -> dict:
    busy, idle = models[cycle % 2], models[1 - cycle % 2]
    if args.unload_each_cycle or cycle == 0:
        for model in (idle, busy):              # both loaded before the pressure
            records.append(send(daemon.base_url, model, args.request_timeout_s + LOAD_S,
                                Record(cycle, "before", model)))
    hog = Hog(args.backend, args.free_target, args.hold_s, args.max_take)
    try:
        hog.wait_held()
        deadline = time.monotonic() + args.hold_s
        while time.monotonic() < deadline:      # requests keep arriving for the busy model
            records.append(send(daemon.base_url, busy, args.request_timeout_s, Record(cycle, "during", busy)))
        hog.wait_released(args.hold_s + 60)
    finally:
        hog.kill()
    for model in (busy, idle):                  # after the pressure: each must succeed
        records.append(send(daemon.base_url, model, args.request_timeout_s, Record(cycle, "after", model)))
    if args.unload_each_cycle or cycle == args.cycles - 1:
        for model in models:                    # every model unloaded: back to the baseline
            unload(daemon, model)
    time.sleep(args.settle_s)                   # a few broker samples after the unload
    return {"cycle": cycle, "busy": busy, "idle": idle, "hog_held_bytes": hog.held,
            "free_at_hold_bytes": hog.free_at_hold, "daemon_bytes_after_unload": daemon_memory(daemon),
            "pool_bytes_after_unload": pool_memory(daemon)}


def unload(daemon, model: str) -> None:
    """Unload model; one the broker (or a failed load) already unloaded answers 404 and
    is logged, not raised: what counts is the daemon's memory after."""
    try:
        daemon.control.model_action(model, "unload")
    except ControlError as exc:
        if exc.status != 404:
            raise
        log.info("%s was not loaded at the unload: %s", model, exc.message)


def judge(records: list[Record], cycles: list[dict], baseline: int, backend: str) -> dict:
    after = [r for r in records if r.phase == "after"]
    memory = [c["daemon_bytes_after_unload"] for c in cycles]
    return {
        "requests": len(records),
        "ok": sum(r.status == 200 and not r.reset for r in records),
        "status_503": sum(r.status == 503 for r in records),
        "status_503_without_retry_after": sum(r.status == 503 and not r.retry_after for r in records),
        "status_500": sum(r.status == 500 for r in records),
        "other_status": sum(r.status not in (None, 200, 503) and r.status != 500 for r in records),
        "resets": sum(r.reset for r in records),
        "hangs": sum(r.hang for r in records),
        "after_pressure_failed": sum(r.status != 200 or r.reset for r in after),
        "after_pressure_max_latency_s": max((r.latency_s for r in after), default=0.0),
        "after_pressure_limit_s": AFTER_LIMIT_S[backend],
        "baseline_daemon_bytes": baseline,
        "after_unload_max_over_baseline_bytes": max((m - baseline for m in memory), default=0),
        "after_unload_growth_bytes": (memory[-1] - memory[0]) if memory else 0,
    }


def passed(summary: dict, backend: str) -> bool:
    checks = [summary["hangs"] == 0, summary["status_500"] == 0, summary["resets"] == 0,
              summary["other_status"] == 0, summary["status_503_without_retry_after"] == 0,
              summary["after_pressure_failed"] == 0,
              summary["after_pressure_max_latency_s"] <= summary["after_pressure_limit_s"]]
    if backend == "cuda":   # NVML's per-process figure: what an unload really gives back
        checks += [summary["after_unload_max_over_baseline_bytes"] <= MEMORY_SLACK,
                   summary["after_unload_growth_bytes"] <= MEMORY_SLACK]
    return all(checks)


def settings_for(args) -> dict:
    settings = common.base_settings(backend=args.backend, num_slots=8, headroom=args.headroom,
                                    model_dir=None, synthetic=True)
    for key in ("admission_timeout_s", "load_timeout_s"):   # default: the daemon's own
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.page_size:   # default: the daemon's own (kvcached/config.py)
        settings["page_size"] = args.page_size
    return settings


def run(args: argparse.Namespace) -> dict:
    models = common.synthetic_models(args.config, 2)
    records: list[Record] = []
    cycles: list[dict] = []
    with running(settings_for(args), name="exhaustion") as daemon:
        daemon.wait_for_device()
        baseline = daemon_memory(daemon)        # before the first load
        # Logged, as each cycle is: a run cut off by its time limit still tells its figures.
        log.info("daemon memory before the first load: %d bytes", baseline)
        started, longest = time.monotonic(), 0.0
        for cycle in range(args.cycles):
            if args.budget_s and time.monotonic() - started + longest > args.budget_s:
                # Stopped short of the caller's time limit, so the run's figures are written.
                log.warning("stopping after %d cycles: another would pass --budget-s %.0f", cycle, args.budget_s)
                break
            began = time.monotonic()
            cycles.append(run_cycle(daemon, cycle, models, args, records))
            longest = max(longest, time.monotonic() - began)
            log.info("cycle %d: %s", cycle, cycles[-1])
        stalls = daemon.log_tail(100000).count("watchdog:")
    summary = judge(records, cycles, baseline, args.backend)
    summary["watchdog_reports"] = stalls
    summary["passed"] = passed(summary, args.backend) and len(cycles) == args.cycles
    return {"backend": args.backend, "models": models, "cycles_run": len(cycles),
            "hold_s": args.hold_s, "free_target_bytes": args.free_target, "headroom_bytes": args.headroom,
            "summary": summary, "cycles": cycles, "records": [asdict(r) for r in records]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("cuda", "host"), default="cuda")
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no cycle that would end past this many seconds (a run that "
                             "stops short is written, and does not pass)")
    parser.add_argument("--hold-s", type=float, default=20.0)
    parser.add_argument("--free-target", type=parse_size, default=None,
                        help="free memory the hog leaves (default: 150MiB on the GPU; on the host "
                             "512 MiB under the headroom)")
    parser.add_argument("--headroom", type=parse_size, default=None,
                        help="the daemon's headroom (default: its own 1 GiB on the GPU; on the host "
                             "what is available now less 4 GiB, so the hog's pressure is ours only)")
    parser.add_argument("--max-take", type=parse_size, default=None,
                        help="most the hog may take (default: no limit on the GPU, 4 GiB on the host)")
    parser.add_argument("--config", default="smollm2-135m", help="synthetic config of both models")
    parser.add_argument("--request-timeout-s", type=float, default=180.0,
                        help="past this a request counts as a hang (more than the daemon's 120 s "
                             "admission wait)")
    parser.add_argument("--admission-timeout-s", type=float, default=None,
                        help="the daemon's admission_timeout_s (default: its own, 120 s)")
    parser.add_argument("--load-timeout-s", type=float, default=None,
                        help="the daemon's load_timeout_s (default: its own, 600 s)")
    parser.add_argument("--page-size", type=parse_size, default=0)
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--out-name", default="exhaustion")
    parser.add_argument("--keep-loaded", dest="unload_each_cycle", action="store_false",
                        help="load both models once and unload them at the end only (the host "
                             "test: a load on a small CPU takes tens of seconds)")
    return parser


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Host: the pressure is relative to what this machine has free now."""
    if args.backend == "host":
        # Other processes on a shared machine move MemAvailable too: the margin keeps
        # their noise out of the headroom, so the pressure is the hog's.
        args.headroom = args.headroom or max(GiB, mem_available() - 4 * GiB)
        args.free_target = args.free_target or max(0, args.headroom - 512 * MiB)
        args.max_take = args.max_take or 4 * GiB
    else:
        args.headroom = args.headroom or GiB
        args.free_target = args.free_target or 150 * MiB
        args.max_take = args.max_take or 1 << 50
    return args


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = resolve_defaults(build_parser().parse_args(argv))
    result = run(args)
    summary = result["summary"]
    print_table(["key", "value"], [[k, v] for k, v in summary.items()])
    path = write_result(args.out_name, result)
    print(json.dumps({"written": str(path), "passed": summary["passed"]}))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
