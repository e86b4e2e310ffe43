"""SIGUSR1 dumps every thread's stack into the daemon's log.

When the daemon hangs, `kill -USR1 <pid>` shows where each thread waits, without
stopping it. faulthandler writes from a C signal handler, so it works while
every Python thread is blocked (a hung daemon on the H200, issue 15, gave no
dump: nothing was registered, and SIGUSR1's default action is to terminate).
It writes to the file descriptor of the stream the log goes to (the daemon
logs to stderr, which the tray's supervisor or systemd sends to the log file).
"""
from __future__ import annotations

import faulthandler
import logging
import signal
import sys
from typing import TextIO

log = logging.getLogger(__name__)


def log_stream() -> TextIO:
    """The stream the root logger writes to (a file or stderr), where a dump belongs."""
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            try:
                stream.fileno()
            except (OSError, ValueError):
                continue
            return stream
    return sys.stderr


def install_stack_dump_signal() -> bool:
    """Register SIGUSR1 (where the platform has it); True when registered."""
    if not hasattr(signal, "SIGUSR1"):
        return False   # Windows: no SIGUSR1; the watchdog still logs stacks of a stall
    stream = log_stream()
    faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True, chain=False)
    log.info("SIGUSR1 dumps every thread's stack into this log")
    return True
