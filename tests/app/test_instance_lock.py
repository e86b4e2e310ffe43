"""One instance: the lock is refused to a second process, and a crashed holder's lock is recovered."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.instance_lock import AlreadyRunning, InstanceLock, holder

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from app.instance_lock import InstanceLock
    lock = InstanceLock(Path(sys.argv[1]))
    lock.acquire("tray", "http://127.0.0.1:5")
    print("held", flush=True)
    time.sleep(60)
""")


def hold_in_child(path: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_process_is_refused_and_told_where(tmp_path: Path) -> None:
    path = tmp_path / "ebbtide.lock"
    child = hold_in_child(path)
    try:
        with pytest.raises(AlreadyRunning) as refused:
            InstanceLock(path).acquire("tray", "http://127.0.0.1:6")
        assert refused.value.info.pid == child.pid
        assert "already running" in str(refused.value) and "http://127.0.0.1:5" in str(refused.value)
        assert holder(path).pid == child.pid
    finally:
        child.kill()
        child.wait()


def test_lock_of_a_killed_process_is_recovered(tmp_path: Path) -> None:
    path = tmp_path / "ebbtide.lock"
    child = hold_in_child(path)
    os.kill(child.pid, signal.SIGKILL)  # a crash: no cleanup runs
    child.wait()
    assert json.loads(path.read_text())["pid"] == child.pid  # the stale file is still there
    assert holder(path) is None
    with InstanceLock(path) as lock:
        info = lock.acquire("daemon", "http://127.0.0.1:7")
        assert info.pid == os.getpid() and holder(path).endpoint == "http://127.0.0.1:7"
    assert holder(path) is None and path.read_text() == ""


def test_garbage_lock_file_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "ebbtide.lock"
    path.write_bytes(b"\xff not json")
    lock = InstanceLock(path)
    lock.acquire("tray", "http://x")
    assert lock.is_held
    lock.release()
    assert not lock.is_held
