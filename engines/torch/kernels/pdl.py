"""Programmatic dependent launch (PDL): a decode step's next kernel starts while this one ends.

Why: a small model's decode step is a chain of ~250 short kernels (SmolLM2-135M's eager
batch-1 graph on the H100: 257 kernels, 816 us, the matvecs 2.3-3.9 us each where their
bytes take a fraction of that; benchmarks/results/README.md). Each kernel waits for the
one before it to finish and flush, then pays its own start and its first trip to DRAM for
weights that never depended on that kernel. On sm_90 and later a kernel launched with
`launch_pdl` may start as soon as every program of the kernel before it has called
`gdc_launch_dependents`: it loads its weights, then `gdc_wait` holds it until the kernel
before has finished and its writes are visible.

The rule every kernel launched this way keeps: before `pdl_wait`, it reads nothing an earlier
kernel of the step wrote (activations, positions, slot ids, the KV cache) and writes
nothing at all (its output may reuse memory the kernel before still reads). Weights and
biases are read before it; everything else after. `pdl_start` (the trigger) comes first in a
kernel: the next kernel's programs then queue behind this one's, never ahead of them (it
can launch only once all of this kernel's programs run). Ordering stays transitive: a
kernel finishes only after its own wait, so each waits, through the chain, for all before.

Kernels that take part: the float matvec (`quant_kernels`: weights before the wait), the
integer-dot matvec and its x quantization (`dp4a_kernels`: they wait first), RMSNorm and its
residual form, the gated activation (`fused_small`), decode attention. The stacked experts'
launches (their expert ids come from the kernel before) and all others launch as before and
so wait for everything before them, as any kernel does. Where PDL cannot run (the CPU,
Triton's interpreter, GPUs before sm_90) `options` turns it off and the kernels compile
without it.
"""
from __future__ import annotations

import functools
import os

import torch

from engines.torch.kernels.quant_decode import tl, triton

_forced: bool | None = None     # set_enabled: None means wherever the device has it


def set_enabled(enabled: bool | None) -> None:
    """Force PDL on (where supported) or off for kernels launched from now on; None: by device.
    For benchmarks measuring it both ways and tests (a graph captured keeps its launches)."""
    global _forced
    _forced = enabled


@functools.lru_cache(maxsize=8)
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def supported(device: torch.device) -> bool:
    """NVIDIA sm_90 or later, the real compiler (the interpreter runs no PTX). Not ROCm: its
    devices are "cuda" to torch too, and their capability numbers are not sm versions."""
    if triton is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.version.hip is not None:
        return False
    return _device_has_pdl(device.index if device.index is not None else torch.cuda.current_device())


def options(device: torch.device) -> dict:
    """Launch arguments for a participating kernel: its USE_PDL and, when on, launch_pdl."""
    on = _forced is not False and supported(device)
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}


if triton is not None:
    @triton.jit
    def pdl_start(USE_PDL: tl.constexpr):
        """Let the next kernel's programs start (each program, first thing)."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def pdl_wait(USE_PDL: tl.constexpr):
        """Block until the kernel before has finished and its writes are visible."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
else:
    pdl_start = pdl_wait = None
