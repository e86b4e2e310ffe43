"""cuBLAS's own handle pools turned off without touching torch's workspace (issue 15).

No GPU here: a stand-in libcublas (built with the C compiler) records what
CUBLAS_WORKSPACE_CONFIG said at each cublasCreate_v2 and "allocates" 64 MiB of a counter
per handle unless it read ":0:0", as the real one does on the H100. The GPU side
(what a handle really holds, GEMM speed) is benchmarks/cublas_handles.py's.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from engines.torch import cublas_pool

FAKE_CUBLAS = r"""
#include <stdlib.h>
#include <string.h>
static char seen[8][32];
static int creates = 0;
static long long free_bytes = 1LL << 34;
static int pool_off = -1;   /* read once, at the first create, as cuBLAS does */
int cublasCreate_v2(void **handle) {
    const char *v = getenv("CUBLAS_WORKSPACE_CONFIG");
    if (creates < 8) strncpy(seen[creates], v ? v : "<unset>", 31);
    if (pool_off < 0) pool_off = v && strcmp(v, ":0:0") == 0;
    creates++;
    if (!pool_off) free_bytes -= 64LL << 20;
    *handle = (void *)(long)creates;
    return 0;
}
int cublasDestroy_v2(void *handle) { if (!pool_off) free_bytes += 64LL << 20; return 0; }
const char *seen_at(int i) { return seen[i]; }
int create_count(void) { return creates; }
long long free_now(void) { return free_bytes; }
"""


@pytest.fixture
def fake_cublas(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stand-in libcublas")
    source, library = tmp_path / "fake_cublas.c", tmp_path / "libcublas.so.13"
    source.write_text(FAKE_CUBLAS)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.seen_at.restype = ctypes.c_char_p
    lib.free_now.restype = ctypes.c_longlong
    return str(library), lib


@pytest.fixture(autouse=True)
def variable_unset(monkeypatch):
    monkeypatch.delenv(cublas_pool.VARIABLE, raising=False)


def test_cublas_reads_no_pool_and_torch_reads_it_unset(fake_cublas):
    path, lib = fake_cublas
    held = cublas_pool.handles_without_own_pool(lib.free_now, path)
    assert lib.seen_at(0) == b":0:0"                    # what cuBLAS read at its first handle
    assert cublas_pool.VARIABLE not in os.environ       # what torch will read: its default
    assert lib.seen_at(1) == b"<unset>"                 # the check's handle came after the unset
    assert held == 0.0                                  # and it held nothing of its own


def test_a_handle_that_kept_its_pool_is_reported(fake_cublas, monkeypatch):
    path, lib = fake_cublas
    monkeypatch.setattr(cublas_pool, "NO_OWN_POOL", ":4096:8")   # cuBLAS reads something else
    assert cublas_pool.handles_without_own_pool(lib.free_now, path) == 64.0
    assert cublas_pool.VARIABLE not in os.environ


def test_a_users_setting_is_kept(fake_cublas, monkeypatch):
    path, lib = fake_cublas
    monkeypatch.setenv(cublas_pool.VARIABLE, ":4096:1")
    assert cublas_pool.handles_without_own_pool(lib.free_now, path) is None
    assert os.environ[cublas_pool.VARIABLE] == ":4096:1"
    assert lib.create_count() == 0


def test_the_loaded_library_is_found_in_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n"
        "7f20-7f30 r-xp 00000000 08:01 2 /site/nvidia/cu13/lib/libcublasLt.so.13\n"
        "7f40-7f50 r-xp 00000000 08:01 3 /site/nvidia/cu13/lib/libcublas.so.13\n")
    assert cublas_pool.loaded_cublas_path(str(maps)) == "/site/nvidia/cu13/lib/libcublas.so.13"
    assert cublas_pool.loaded_cublas_path(str(tmp_path / "absent")) is None


def test_no_cublas_in_the_process_changes_nothing(monkeypatch):
    monkeypatch.setattr(cublas_pool, "loaded_cublas_path", lambda: None)
    assert cublas_pool.handles_without_own_pool(lambda: 0) is None
    assert cublas_pool.VARIABLE not in os.environ


def test_a_library_that_cannot_be_loaded_leaves_things_as_they_were(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert cublas_pool.handles_without_own_pool(lambda: 0, str(tmp_path / "libcublas.so.13")) is None
    assert cublas_pool.VARIABLE not in os.environ
    assert "could not turn cuBLAS's own handle pools off" in caplog.text
