"""A backstop for the whole suite: a test stuck where no signal reaches it ends the run.

pytest-timeout interrupts a slow test with SIGALRM, which Python handles only
when the main thread returns to the interpreter. A main thread blocked in C
(a Tk call from a foreign thread once waited on a condition variable for good)
never does, and CI ran into its own time limit with no word on where. This
watchdog runs in C (faulthandler): past twice a test's timeout it prints every
thread's stack and exits, so the run fails fast and says where it stood.
"""
from __future__ import annotations

import faulthandler
import os
import sys

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, that is when its module
# is first imported, by whichever test comes first. Without a GPU a kernel can only
# run through the interpreter, so the whole suite says so before anything imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKSTOP_FACTOR = 2.0   # past pytest-timeout's own limit, which gets the first try


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and (marker.args or "timeout" in marker.kwargs):
        return float(marker.args[0] if marker.args else marker.kwargs["timeout"])
    return float(item.config.getini("timeout") or 0)


def _real_stderr(config: pytest.Config) -> int | object:
    """Where the stacks must go: the run's own stderr. pytest captures fd 2 into a
    temporary file while a test runs (sys.__stderr__ included), and the process exits
    before it would show it: the first backstop in CI printed nowhere. The capture
    keeps a copy of the real fd 2; use it where this pytest has one."""
    capman = config.pluginmanager.getplugin("capturemanager")
    saved = getattr(getattr(getattr(capman, "_global_capturing", None), "err", None), "targetfd_save", None)
    return saved if isinstance(saved, int) else sys.__stderr__


@pytest.fixture(autouse=True)
def _hard_timeout(request: pytest.FixtureRequest):
    limit = _timeout_of(request.node)
    if limit > 0:
        faulthandler.dump_traceback_later(limit * BACKSTOP_FACTOR, exit=True, file=_real_stderr(request.config))
    yield
    faulthandler.cancel_dump_traceback_later()
