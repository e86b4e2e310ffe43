"""A normed activation's int8 copy (ggml's q8_1), written by the RMSNorm that wrote it.

Why: the integer-dot matvec (quant_dp4a) quantizes its x in a launch of its own, and
on the projections after a norm (q/k/v, gate/up, an MoE layer's gate/up pairs, the
output head) that launch re-reads what the norm has just written. The served
Qwen3-30B-A3B step ran 145 of those a step, ~1.4 us each on the H200 (profile_moe),
in a step ~5% short of llama.cpp's. A norm marked `quantize_output` (the model marks
the norms whose readers take the integer dots: model.mark_quantized_norms) writes the
quants in the same launch (fused_small), and `quantize_x` finds them here instead of
launching.

How a reader finds them: by the tensor the norm returned. A view of it (a reshape)
shares its storage and data pointer; an entry is used only while that tensor lives
(a weak reference) and for the same bytes (pointer, storage, element count), so an
address the caching allocator hands out again never matches a stale entry. Nothing
writes a norm's output in place (the layers only read it), and decode's inference
tensors keep no version counter to check that with. Inside a CUDA graph capture this
Python runs once and the graph keeps the addresses, so replays read the quants the
norm's replay wrote.
"""
from __future__ import annotations

import threading
import weakref

import torch

QK = 32   # values a block of quants (quant_dp4a.QK)

_LOCAL = threading.local()   # one table a thread: each model's steps run on their own


def allocate(rows: int, n_cols: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Buffers for rows of n_cols values (n_cols a multiple of 32): quants, scale and scaled
    sum of each 32, quant sum of each 16, as quant_dp4a.quantize_x returns them."""
    blocks = rows * n_cols // QK
    return (torch.empty(blocks * QK, dtype=torch.int8, device=device),
            torch.empty(blocks, dtype=torch.float32, device=device),
            torch.empty(blocks, dtype=torch.float32, device=device),
            torch.empty(blocks * 2, dtype=torch.int32, device=device))


def _table() -> dict[int, tuple]:
    table = getattr(_LOCAL, "table", None)
    if table is None:
        table = _LOCAL.table = {}
    return table


def remember(out: torch.Tensor, quants: tuple[torch.Tensor, ...]) -> None:
    """out (a norm's output, contiguous) has these quants."""
    table = _table()
    for ptr in [p for p, (ref, *_rest) in table.items() if ref() is None]:
        del table[ptr]   # tensors gone: their addresses may come back for others
    table[out.data_ptr()] = (weakref.ref(out), out.numel(), quants)


def recall(x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The quants of x where x is (a contiguous view of) a remembered norm output."""
    entry = _table().get(x.data_ptr())
    if entry is None or not x.is_contiguous():
        return None
    ref, numel, quants = entry
    out = ref()
    if out is None or x.numel() != numel or x.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
        return None
    return quants
