"""A captured decode step's first kernel: its tokens, positions and slots read from the host.

The host writes a step's inputs into a pinned buffer [3, B] (token ids, positions,
slots); the graph's first launch reads them from there over the bus (pinned memory is
mapped into the device's address space) into the fixed device buffers every later
kernel reads. Before, the host copied the buffer to the device (a DMA of its own, an
event, then the graph waiting on both) and the graph copied it apart again in three
copy nodes: the inputs' part of a SmolLM2-135M token was ~100 us on the H100 beside a
~720 us step (benchmarks/results: decode_profile's host lines). Loads are volatile: a
replay must read what the host wrote since the last one, never a cached line.
"""
from __future__ import annotations

import torch

from engines.torch.kernels.quant_decode import tl, triton

if triton is not None:
    @triton.jit
    def _take_kernel(src_ptr, ids_ptr, pos_ptr, slots_ptr, rows, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        live = i < rows
        tl.store(ids_ptr + i, tl.load(src_ptr + i, mask=live, volatile=True), mask=live)
        tl.store(pos_ptr + i, tl.load(src_ptr + rows + i, mask=live, volatile=True), mask=live)
        tl.store(slots_ptr + i, tl.load(src_ptr + 2 * rows + i, mask=live, volatile=True), mask=live)


def take(src: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> None:
    """ids, pos, slots (int64, B each, contiguous) <- rows 0, 1, 2 of src [3, B] int64, in one
    launch; src may be pinned host memory (read where it lies) or on the device."""
    rows = src.shape[1]
    _take_kernel[(1,)](src, ids, pos, slots, rows, BLOCK=max(16, triton.next_power_of_2(rows)), num_warps=1)
