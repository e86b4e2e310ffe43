"""The real daemon points compiled-kernel caches under its own cache dir at start."""
from __future__ import annotations


def test_daemon_keeps_compiled_kernels_in_its_cache_dir(live_server) -> None:
    keys = list((live_server.home / "cache" / "compile").glob("*/key.txt"))
    assert len(keys) == 1, "the daemon made no keyed compile cache folder"
    assert "torch=" in keys[0].read_text()
    assert "compiled kernels cached under" in live_server.log()
