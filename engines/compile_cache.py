"""Compiled kernels kept once per install, not once per load.

torch.compile (Inductor's FX graph and kernel caches, its autotune results) and
Triton (every JIT-compiled kernel: the decode attention, the quantized matmuls)
cache what they compile under directories named by TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR. Left alone they land in /tmp (Inductor: /tmp/torchinductor_USER),
which a reboot empties, so a model's first load after every boot compiled again:
~56 s for the first decode bucket of an 8B shape on the H100 (runner.py).

`use(root)` points both at `root/compile/<key>/`, where the key names everything
a compiled artifact depends on beyond its own inputs: torch and Triton versions,
the CUDA driver and the GPU. A change of any of these gives a new key, so
artifacts built for the old stack are never read; older keys' folders are removed
(they could never be read again). A cache directory the user set is left alone.

It reads versions from package metadata and the GPU from NVML, never importing
torch or triton: the daemon calls it at start, and keeps torch off its start path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_ENV = "TRITON_CACHE_DIR"


@dataclass(frozen=True)
class StackKey:
    """What compiled kernels depend on, besides the model's shapes (which the caches key themselves)."""
    torch: str
    triton: str
    driver: str
    gpu: str

    def digest(self) -> str:
        text = "|".join((self.torch, self.triton, self.driver, self.gpu))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def _gpu_and_driver() -> tuple[str, str]:
    """(GPU name, driver version) of device 0 through NVML; ("cpu", "none") without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return _text(pynvml.nvmlDeviceGetName(handle)), _text(pynvml.nvmlSystemGetDriverVersion())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver, no device: CPU kernels only
        return "cpu", "none"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def current_key() -> StackKey:
    gpu, driver = _gpu_and_driver()
    return StackKey(torch=_version("torch"), triton=_version("triton"), driver=driver, gpu=gpu)


def use(root: Path, key: StackKey | None = None) -> Path:
    """Point Inductor's and Triton's caches under root/compile/<key>; returns that folder."""
    key = key or current_key()
    base = Path(root) / "compile"
    folder = base / key.digest()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.txt").write_text(f"{key}\n")
    _remove_other_keys(base, keep=folder)
    for name, sub in ((INDUCTOR_ENV, "inductor"), (TRITON_ENV, "triton")):
        if os.environ.get(name):
            log.info("%s is set (%s): compiled kernels are cached there", name, os.environ[name])
            continue
        os.environ[name] = str(folder / sub)
    log.info("compiled kernels cached under %s (%s)", folder, key)
    return folder


def _remove_other_keys(base: Path, keep: Path) -> None:
    for old in base.iterdir():
        if old != keep and old.is_dir():
            log.info("removing compiled kernels of another torch/Triton/driver/GPU: %s", old)
            shutil.rmtree(old, ignore_errors=True)
