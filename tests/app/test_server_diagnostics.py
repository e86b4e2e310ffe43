"""A hung daemon can be looked into (issue 15), on a real daemon process:
SIGUSR1 writes every thread's stack into its log and it goes on serving, and
/control/memory says how old its device figures are (a stopped monitor shows)."""
from __future__ import annotations

import signal
import time


def _wait_for_broker(daemon, http) -> dict:
    deadline = time.monotonic() + 90   # the broker opens in the background (it imports torch)
    while (memory := http.get("/control/memory").json())["broker"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return memory


def test_sigusr1_dumps_every_threads_stack_into_the_log_and_serving_goes_on(start_daemon) -> None:
    daemon = start_daemon()
    with daemon.client(headers=daemon.auth) as http:
        memory = _wait_for_broker(daemon, http)
        assert memory["broker"] is not None
        # The sampling thread runs: its last sample is a few intervals (0.2 s) old at most.
        assert 0 <= memory["sample_age_s"] < 10 and memory["broker"]["sample_age_s"] == memory["sample_age_s"]
        assert "SIGUSR1 dumps every thread's stack" in daemon.log()
        daemon.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while "Current thread" not in (log := daemon.log()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Current thread" in log                      # faulthandler's all-threads dump
        assert log.count("Thread 0x") >= 3                  # the broker's, the event loop's, ...
        assert 'File "' in log and "kvcached/broker/" in log   # frames name their source (the broker's threads)
        assert daemon.proc.poll() is None
        assert http.get("/health").status_code == 200       # it goes on serving
