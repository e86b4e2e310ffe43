"""benchmarks/exhaustion.py's scenario on the host backend, on every commit (issue 15):
a real daemon serving two synthetic models on the torch engine, and a real child
process (benchmarks/memory_hog.py) taking the host's memory down into the daemon's
headroom and holding it while requests arrive, then letting go. Every request is
answered 200, or 503 with Retry-After; none 500, none reset, none hangs; every
request after the pressure succeeds. (Latencies and the NVML memory after unloads
are the GPU run's to judge: `scripts/gpu_check.sh exhaustion`.)"""
from __future__ import annotations

import pytest

from benchmarks import exhaustion


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_daemon_under_memory_exhaustion_never_hangs_and_never_answers_500(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))       # the result JSON stays out of the repository
    args = exhaustion.resolve_defaults(exhaustion.build_parser().parse_args(
        ["--backend", "host", "--cycles", "2", "--hold-s", "4", "--admission-timeout-s", "3",
         "--request-timeout-s", "400", "--load-timeout-s", "300", "--keep-loaded"]))
    result = exhaustion.run(args)
    summary, records = result["summary"], result["records"]
    assert result["cycles_run"] == 2 and all(c["hog_held_bytes"] > 0 for c in result["cycles"])
    assert {r["phase"] for r in records} >= {"before", "during", "after"}
    assert summary["hangs"] == 0 and summary["resets"] == 0
    assert summary["status_500"] == 0 and summary["other_status"] == 0
    assert summary["status_503_without_retry_after"] == 0
    assert summary["ok"] + summary["status_503"] == summary["requests"]
    assert summary["after_pressure_failed"] == 0    # the next requests after the pressure succeed


def test_a_run_stops_before_a_cycle_would_pass_its_budget_and_is_written_as_not_passed(monkeypatch):
    """--budget-s (gpu_check's limit less a margin): the cycles run so far are judged and
    written, not lost to the caller's timeout (a cold GPU machine was cut off so at cycle 9)."""
    import contextlib
    import itertools

    class Daemon:
        def control_get(self, path):
            return {"broker": {"pool_held_bytes": 0}, "device": {"ours_bytes": 100}}

        def log_tail(self, n):
            return ""

        def wait_for_device(self):
            return 0.0

    clock = itertools.count(0.0, 10.0)              # every reading of the clock: 10 s later
    monkeypatch.setattr(exhaustion.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(exhaustion, "running", lambda *a, **k: contextlib.nullcontext(Daemon()))
    monkeypatch.setattr(exhaustion, "run_cycle", lambda daemon, cycle, *a: {
        "cycle": cycle, "daemon_bytes_after_unload": 100, "pool_bytes_after_unload": 0})
    args = exhaustion.resolve_defaults(exhaustion.build_parser().parse_args(
        ["--backend", "cuda", "--cycles", "10", "--budget-s", "45"]))
    result = exhaustion.run(args)
    assert 0 < result["cycles_run"] < 10
    assert result["summary"]["hangs"] == 0 and not result["summary"]["passed"]
