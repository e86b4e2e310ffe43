"""A gated MLP's activation, computed where the next kernel reads its input.

The gate/up projection writes h = [gate | up] (one row of 2K per token); the down
projection reads x = act(gate) * up (K). Eager, that was a kernel of its own between
the two (`fused_small.gated_activation`): one launch a layer, ~4 us inside a CUDA
graph on the H100, in a SmolLM2-135M step of ~8 kernels a layer that is bound by
launches, not bytes (benchmarks/results: 0.96 ms a step, its weights read in ~30 us).
Here the down projection's x loads call `load_x`, which reads gate and up and returns
act(gate) * up, rounded to h's dtype as the kernel in between wrote it: the same
values, one launch fewer. Used by the float matvec (`quant_kernels._qmv_kernel`) and
the dp4a path's x quantization (`dp4a_kernels.quantize_x_kernel`).

GATE: 0 none (x read as is), 1 SiLU, 2 tanh-approximated GELU (GeGLU: Gemma).
"""
from __future__ import annotations

from engines.torch.kernels.quant_decode import tl, triton

KINDS = {"silu": 1, "gelu_tanh": 2}   # MLP.activation -> GATE


def gate_code(kind: str | None) -> int:
    """The kernels' GATE for an activation kind; 0 (x read as is) for None."""
    if kind is None:
        return 0
    if kind not in KINDS:
        raise ValueError(f"gated activation: {kind!r} is not one of {', '.join(KINDS)}")
    return KINDS[kind]


if triton is not None:
    @triton.jit
    def activate(gate, up, GATE: tl.constexpr):
        """act(gate) * up in float32. c = 2 * sqrt(2 / pi) is a literal: Triton's compiler takes
        no module global in a kernel, its interpreter no constexpr one."""
        if GATE == 1:
            return gate * tl.sigmoid(gate) * up
        return gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)) * up

    @triton.jit
    def load_x(ptr, off, mask, up_offset, GATE: tl.constexpr):
        """x at ptr + off in float32; with GATE, act(gate at off) * up at off + up_offset,
        rounded through ptr's dtype first."""
        x = tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)
        if GATE != 0:
            up = tl.load(ptr + off + up_offset, mask=mask, other=0.0).to(tl.float32)
            x = activate(x, up, GATE).to(ptr.dtype.element_ty).to(tl.float32)
        return x
else:   # no Triton here: nothing launches these (the callers check for triton first)
    activate = load_x = None
