"""RoPE's cos and sin for a step's positions in one launch (`model.rotary.Rotary`).

Eager, Rotary's forward is six or seven torch kernels (the positions' cast, the
product with the frequencies, the cat of the two halves, cos, sin, the magnitude
scale twice, a pad for partial RoPE): a fixed cost of every decode step, which on
SmolLM2-135M is bound by its number of launches (normed_input.py says how many).
Here one program a position writes both rows, float32, with the same formula:
angle = position * inv_freq[i mod R/2] for dims i < R (R the rotated dims), 0 past
R, each scaled by the magnitude factor of its dim. `usable` says where (eager CUDA).
"""
from __future__ import annotations

import torch

from engines.torch.kernels import pdl
from engines.torch.kernels.pdl import pdl_start, pdl_wait
from engines.torch.kernels.quant_decode import tl, triton


def usable(positions: torch.Tensor) -> bool:
    """Eager on the GPU (compiled steps leave Rotary's ops to Inductor, which fuses them)."""
    return triton is not None and positions.is_cuda and not torch.compiler.is_compiling()


if triton is not None:
    @triton.jit
    def _rope_kernel(pos_ptr, inv_ptr, scale_ptr, cos_ptr, sin_ptr, HALF, D,
                     BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)     # the positions may come from the kernel before (step_inputs)
        row = tl.program_id(0)
        dims = tl.arange(0, BLOCK)
        live = dims < D
        rotated = dims < 2 * HALF
        freq = tl.load(inv_ptr + dims % tl.maximum(HALF, 1), mask=live & rotated, other=0.0)
        angle = tl.load(pos_ptr + row).to(tl.float32) * freq
        scale = tl.load(scale_ptr + dims, mask=live, other=0.0)
        tl.store(cos_ptr + row * D + dims, tl.cos(angle) * scale, mask=live)
        tl.store(sin_ptr + row * D + dims, tl.sin(angle) * scale, mask=live)


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor, mscale: torch.Tensor,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, 1, T, head_dim] float32; inv_freq [R/2], mscale [head_dim]."""
    rows = positions.numel()
    cos = torch.empty((*positions.shape, head_dim), dtype=torch.float32, device=positions.device)
    sin = torch.empty_like(cos)
    if rows:
        _rope_kernel[(rows,)](positions.contiguous(), inv_freq.float().contiguous(), mscale.float().contiguous(),
                              cos, sin, inv_freq.numel(), head_dim, BLOCK=triton.next_power_of_2(head_dim),
                              num_warps=1, **pdl.options(positions.device))
    return cos.unsqueeze(1), sin.unsqueeze(1)
