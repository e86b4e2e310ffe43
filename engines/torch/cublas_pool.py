"""cuBLAS handles without cuBLAS's own workspace pool (issue 15).

Why: cublasCreate gives every handle a workspace pool of its own, sized by
CUBLAS_WORKSPACE_CONFIG, which cuBLAS reads once per process: 64 MiB a handle on the
H100 with CUDA 13 (logs/cublas_handles_probe_h100.log). torch gives each thread that runs
cuBLAS a handle from a pool it never shrinks, and hands every handle a workspace of its
own from the caching allocator (cublasSetWorkspace), so cuBLAS's pool is never used; it
only stays, 64 MiB for every serving thread that ever ran at once, until the process ends:
the second of two models decoding together left exactly that after both unloaded.

torch sizes *its* workspace from the same variable (32 MiB on Hopper when unset; any set
value gave it 4 MiB, and decode's GEMVs ran ~3x slower on the H100), so the variable
cannot just be set. It is set to ":0:0" while one handle is created and destroyed through
the library torch loaded (cuBLAS reads it then), and unset before torch reads it at its
first GEMM. A user who set the variable keeps their setting.
"""
from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
NO_OWN_POOL = ":0:0"


def loaded_cublas_path(maps: str = "/proc/self/maps") -> str | None:
    """The libcublas torch loaded into this process (not cuBLASLt), None if none is."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                path = line.rsplit(" ", 1)[-1].strip()
                if "/libcublas.so" in path:
                    return path
    except OSError:
        return None
    return None


def handle_mib(library: ctypes.CDLL, free_bytes: Callable[[], int]) -> float:
    """Create one handle, read what it took of the device (free_bytes before and after), destroy it."""
    handle = ctypes.c_void_p()
    before = free_bytes()
    status = library.cublasCreate_v2(ctypes.byref(handle))
    if status != 0:
        raise RuntimeError(f"cublasCreate_v2 returned status {status}")
    held = max(0, before - free_bytes()) / (1 << 20)
    library.cublasDestroy_v2(handle)
    return held


def handles_without_own_pool(free_bytes: Callable[[], int], library_path: str | None = None) -> float | None:
    """Make cuBLAS read ":0:0" for its own pools, before torch's first GEMM in this process
    (torch's own workspace keeps its default). free_bytes: the device's free memory now
    (torch.cuda.mem_get_info()[0]). Returns what one more handle then holds, in MiB (0 when
    it worked), or None where nothing was changed (a user's setting, no cuBLAS loaded)."""
    if os.environ.get(VARIABLE) is not None:
        log.info("%s=%s set by the user: each cuBLAS handle keeps the pool it sizes",
                 VARIABLE, os.environ[VARIABLE])
        return None
    path = library_path or loaded_cublas_path()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(path)
        os.environ[VARIABLE] = NO_OWN_POOL
        try:
            handle_mib(library, free_bytes)   # cuBLAS reads the variable at its first handle
        finally:
            del os.environ[VARIABLE]     # before torch's first GEMM reads it for its workspace
        return handle_mib(library, free_bytes)   # the check: what a handle holds now
    except (OSError, AttributeError, RuntimeError) as exc:   # serving goes on; handles keep their pools
        log.warning("could not turn cuBLAS's own handle pools off (%s): each serving thread's handle keeps one", exc)
        return None

