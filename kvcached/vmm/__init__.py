"""VMM backends, chosen in one place.

`resolve_backend(config)` is the one place the device is decided: the cuda
backend when a CUDA device and driver answer, else the host backend;
`config.backend` forces one. `open_backend(config)` opens what it names. The
daemon opens one backend (app/daemon.py) and every model's KV, the page pool
and the broker's monitor follow `backend.name` / `backend.device` from there.
The cuda module is imported only when asked for, so the host path needs no
cuda-python.
"""
from __future__ import annotations

import logging
from typing import Callable

from kvcached.config import KvcachedConfig
from kvcached.errors import BackendUnavailable
from kvcached.vmm.backend import Handle, VmmBackend

log = logging.getLogger(__name__)

__all__ = ["open_backend", "resolve_backend", "cuda_available", "VmmBackend", "Handle"]


def _open_cuda(config: KvcachedConfig) -> VmmBackend:
    from kvcached.vmm.cuda import CudaBackend

    return CudaBackend(config)


def _open_host(config: KvcachedConfig) -> VmmBackend:
    from kvcached.vmm.host import HostBackend

    return HostBackend(config)


_OPENERS: dict[str, Callable[[KvcachedConfig], VmmBackend]] = {
    "cuda": _open_cuda,
    "host": _open_host,
}


def cuda_available(device: int = 0) -> bool:
    """True when cuda-python imports, the driver initializes and `device` exists."""
    try:
        from kvcached.vmm.cuda import device_count
    except ImportError:
        return False
    try:
        return device_count() > device
    except BackendUnavailable:
        return False


def resolve_backend(config: KvcachedConfig) -> str:
    """The backend `config.backend` names; "auto": "cuda" if it answers, else "host"."""
    if config.backend != "auto":
        return config.backend
    return "cuda" if cuda_available(config.device) else "host"


def open_backend(config: KvcachedConfig) -> VmmBackend:
    """The backend resolve_backend(config) names, opened."""
    backend = _OPENERS[resolve_backend(config)](config)
    log.info("kvcached VMM backend: %s (granularity %d bytes)", backend.name, backend.granularity)
    return backend
