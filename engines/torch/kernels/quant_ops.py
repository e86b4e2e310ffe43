"""`qlinear`: y = x @ W^T (+ bias) with W a `QuantWeight` kept in GGUF block form.

Dispatch, on the rows M of x (all leading dims flattened):
- CUDA with Triton, 1 to 8 rows (decode), Q4_K, Q6_K, Q4_0 or Q8_0, where the
  weight has rows enough to win (`quant_dp4a.chosen`): `quant_dp4a.qmatvec_dp4a`,
  x quantized to int8 and the weights' quants multiplied on integer dot products
  (as llama.cpp's MMVQ; quant_dp4a says why).
- CUDA with Triton, a block type, M <= `quant_kernels.matvec_max_rows` (4; 8 for
  Q8_0) (decode): `quant_kernels.qmatvec`, the memory-bound matrix-vector kernel
  that reads each quantized byte once. Its cost grows with M, so past that many
  rows the prefill path wins (benchmarks/results/quant_matvec.json, M=4 and 8).
- CUDA with Triton, more rows (prefill, batch > 4): dequantize W into a scratch
  buffer of x's dtype with the Triton dequantize kernel, then cuBLAS (`F.linear`).
  Measured against the Triton dequantize-tile matmul (`qmatmul_fused`) and bf16
  cuBLAS on the H200 (benchmarks/quant_matvec.py, "earlier_run_h200"): Q4_K
  4096x14336 at M=4096, 608 us against 7,220 us fused and 614 us for bf16
  cuBLAS on a plain bf16 weight; at M=512, 118 against 882 and 81. At prefill
  sizes the matmul is compute-bound: the dequantize pass costs a read of the
  quantized bytes and a write + read of bf16 (~30 us for 58M weights), while
  cuBLAS's pipelined, warp-specialized Hopper kernels (TMA, wgmma) run far ahead
  of a Triton loop whose B operand is decoded in registers and staged through
  shared memory by hand, unpipelined. Big weights (the output head) are
  dequantized in row slices so the scratch stays under SCRATCH_WEIGHTS.
- F16/BF16/F32 weights: `F.linear` on the plain tensor.
- Elsewhere (CPU, no Triton, K-quant rows that are not whole 256-weight
  super-blocks): the reference path, the torch decoders of
  engines.torch.load.dequant and an fp32 matmul.

No path syncs with the host or sizes anything from device data, so all of them
run inside CUDA graphs (tests/gpu/test_quant_kernels_gpu.py captures and replays
each); scratch comes from the caching allocator (the graph's private pool during
capture). Under torch.compile qlinear is one custom op, `ebbtide::qlinear`, with a
fake for shapes: the compiled decode step stays one graph around it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from engines.torch.kernels import fused_small, quant_dp4a, quant_group, quant_kernels
from engines.torch.kernels.activations import ACTIVATIONS
from engines.torch.kernels.normed_input import NormedInput
from engines.torch.kernels.quant_weight import FLOAT_TYPES, QuantWeight

_REPEATED = threading.local()   # repeated_rows() is on in this thread
_GATED_KERNELS = {"on": True}    # qlinear_gated's kernels built here (off after a build error)
_NORMED_KERNELS = {"on": True}   # qlinear_normed's, the same way
_GROUP_KERNELS = {"on": True}    # qlinear_group's, the same way
try:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
    _KERNEL_BUILD_ERRORS: tuple[type[BaseException], ...] = (CompilationError, OutOfResources)
except ImportError:   # no Triton: nothing is built
    _KERNEL_BUILD_ERRORS = ()
log = logging.getLogger(__name__)
SCRATCH_WEIGHTS = 64 * 1024 * 1024   # 128 MiB of bf16: every layer of an 8B model in one piece


def qlinear_reference(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize the whole weight with the torch decoders and matmul in float32."""
    y = x.float() @ w.dequantize(torch.float32).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def qmatmul_dequant(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N]: Triton dequantize into scratch of x's dtype, then a cuBLAS matmul, in row slices."""
    dtype = x.dtype
    bias = None if bias is None else bias.to(dtype)
    n, k = w.shape
    step = max(64, SCRATCH_WEIGHTS // k // 64 * 64)
    if step >= n:
        return F.linear(x, quant_kernels.dequantize(w, dtype), bias)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        part = quant_kernels.dequantize(w.row_slice(start, stop), dtype)
        out[:, start:stop] = F.linear(x, part, None if bias is None else bias[start:stop])
    return out


@contextlib.contextmanager
def repeated_rows() -> Iterator[None]:
    """While a CUDA graph of one request padded to two identical rows is captured (the
    compiled step's smallest batch is 2: engines/torch/serve/batch_one.py): each quantized
    projection computes row 0 alone, with the one-row kernels, and repeats it. The graph
    records those kernels; replays run no Python. Only for inputs whose rows are equal."""
    before = getattr(_REPEATED, "on", False)
    _REPEATED.on = True
    try:
        yield
    finally:
        _REPEATED.on = before


def _qlinear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None, gated: str | None = None) -> torch.Tensor:
    """gated: x is a gated MLP's [..., gate | up] and W reads act(gate) * up (qlinear_gated)."""
    if gated is not None and not (_eager_gpu(x.device) and w.type_name not in FLOAT_TYPES
                                  and quant_kernels.kernel_ready(w)):
        return _qlinear(gated_activation(x, gated), w, bias)    # no decode kernel reads W here
    if w.type_name in FLOAT_TYPES:
        weight = w.planes["w"]
        return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype),
                        None if bias is None else bias.to(x.dtype))
    if getattr(_REPEATED, "on", False) and x.numel() == 2 * w.shape[1]:
        row = _qlinear(x.reshape(2, -1)[:1], w, bias)
        return torch.cat([row, row]).reshape(*x.shape[:-1], w.shape[0])
    if not (x.is_cuda and quant_kernels.kernel_ready(w)):
        return qlinear_reference(x, w, bias)
    x2 = x.reshape(-1, w.shape[1] * (1 if gated is None else 2))
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], w.shape[0]))
    if quant_dp4a.chosen(w, x2.shape[0]):
        y = _plus(quant_dp4a.qmatvec_dp4a(x2, w, gated=gated), bias)
    elif x2.shape[0] <= quant_kernels.matvec_max_rows(w.type_name):
        y = quant_kernels.qmatvec(x2, w, bias, gated=gated)
    else:   # prefill: the activation as a kernel of its own, then dequantize + cuBLAS
        y = qmatmul_dequant(x2 if gated is None else gated_activation(x2, gated), w, bias)
    return y.reshape(*x.shape[:-1], w.shape[0])


def gated_activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up of h = [..., gate | up], in h's dtype."""
    if fused_small.usable(h):
        return fused_small.gated_activation(h, kind)
    gate, up = h.chunk(2, dim=-1)
    return ACTIVATIONS[kind](gate) * up


def _built(flag: dict, what: str, instead: str, run: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """run() while `flag` is on; None where its kernels do not compile on this device (a Triton
    or GPU unlike the H100 they were run on): logged once, the flag off from then on."""
    if not flag["on"]:
        return None
    try:
        return run()
    except _KERNEL_BUILD_ERRORS as exc:
        flag["on"] = False
        log.warning("%s do not build here (%s): %s", what, exc, instead)
        return None


def _eager_gpu(device: torch.device) -> bool:
    """Where the fused decode launchers run: eager on CUDA (compiled steps leave the fusions
    to Inductor) and not inside repeated_rows' one-row projections."""
    return device.type == "cuda" and not torch.compiler.is_compiling() and not getattr(_REPEATED, "on", False)


def qlinear_gated(h: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None, kind: str) -> torch.Tensor:
    """qlinear(act(gate) * up) for h = [..., gate | up] (a gated MLP's down projection). Where a
    decode kernel reads W on the GPU (eager: compiled steps leave the activation to Inductor),
    it computes the activation as it reads x (gated_input.py): one launch a layer fewer;
    elsewhere the activation first, then qlinear."""
    if not torch.compiler.is_compiling():
        y = _built(_GATED_KERNELS, "the down projection's gated x loads", "the activation runs as a kernel of its own",
                   lambda: _qlinear(h, w, bias, gated=kind))
        if y is not None:
            return y
    return qlinear(gated_activation(h, kind), w, bias)


def use_normed_kernels(on: bool) -> None:
    """Whether qlinear_normed may read a deferred norm in its kernel (A/Bs: decode_profile)."""
    _NORMED_KERNELS["on"] = on


def qlinear_normed(h: NormedInput, w: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """qlinear(rms_norm(x + delta)) for a deferred norm (normed_input.py). Where a decode
    kernel reads W (eager, a few rows), it reads the norm itself: the float matvec in its
    x loads, the dp4a path as it quantizes x: one launch a norm fewer; elsewhere the norm
    first (computed once for all its consumers), then qlinear."""
    run = _normed_kernel(h, w, bias) if _eager_gpu(h.device) else None
    y = None if run is None else _built(_NORMED_KERNELS, "the projections' normed x loads",
                                        "the norm runs as a kernel of its own", run)
    return qlinear(h.materialize(), w, bias) if y is None else y.view(*h.shape[:-1], w.shape[0])


def _normed_kernel(h: NormedInput, w: QuantWeight, bias: torch.Tensor | None) -> Callable[[], torch.Tensor] | None:
    """The decode kernel that reads h's norm itself for W, or None where none does."""
    rows = h.rows()
    if w.type_name in FLOAT_TYPES or not quant_kernels.kernel_ready(w) or rows == 0:
        return None
    if quant_dp4a.chosen(w, rows):
        if not quant_dp4a.takes_normed(w.shape[1]):
            return None
        return lambda: _plus(quant_dp4a.qmatvec_dp4a(h, w), bias)
    if rows > quant_kernels.matvec_max_rows(w.type_name):
        return None
    return lambda: quant_kernels.qmatvec(h, w, bias)


def _plus(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def use_group_kernels(on: bool) -> None:
    """Whether qlinear_group may run projections of one x as one launch (A/Bs: decode_profile)."""
    _GROUP_KERNELS["on"] = on


def qlinear_group(x: torch.Tensor | NormedInput, weights: list[QuantWeight],
                  biases: list[torch.Tensor | None]) -> list[torch.Tensor] | None:
    """[qlinear(x, w, b) for each], the weights that the float decode kernel would run alike in
    one launch (eager on the GPU: quant_group.grouped; an 8B's k and v where q takes dp4a), the
    others one each; None where fewer than two group (the caller runs them one by one)."""
    if not _eager_gpu(x.device):
        return None
    rows = x.rows() if isinstance(x, NormedInput) else x.numel() // x.shape[-1]
    together = _groupable(weights, rows)
    if len(together) < 2:
        return None
    group_x = x.materialize() if isinstance(x, NormedInput) and not _NORMED_KERNELS["on"] else x
    y = _built(_GROUP_KERNELS, "projections of one x as one launch", "one launch each",
               lambda: quant_group.qmatvec_group(group_x, [weights[i] for i in together], [biases[i] for i in together]))
    if y is None:
        return None
    grouped = dict(zip(together, y.view(*x.shape[:-1], -1).split([weights[i].shape[0] for i in together], dim=-1)))
    return [grouped[i] if i in grouped else _alone(x, w, b) for i, (w, b) in enumerate(zip(weights, biases))]


def _groupable(weights: list[QuantWeight], rows: int) -> list[int]:
    """Indexes of the weights that run as one launch: all, else all but the first or the last
    (a dp4a q beside float k and v), else none."""
    for picked in (range(len(weights)), range(1, len(weights)), range(len(weights) - 1)):
        if len(picked) >= 2 and quant_group.grouped([weights[i] for i in picked], rows):
            return list(picked)
    return []


def _alone(x: torch.Tensor | NormedInput, w: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    return qlinear_normed(x, w, bias) if isinstance(x, NormedInput) else qlinear(x, w, bias)


# Under torch.compile the call is one opaque op (as kv_access's slot_attend): Dynamo does not
# trace the launchers' Python (lru_cache, device queries), and the compiled decode step keeps
# one graph. A QuantWeight is no op argument; its planes, type and shape are.
@torch.library.custom_op("ebbtide::qlinear", mutates_args=())
def _qlinear_op(x: torch.Tensor, planes: list[torch.Tensor], type_name: str, out_features: int,
                in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _qlinear(x, QuantWeight.from_plane_list(type_name, (out_features, in_features), planes), bias)


@_qlinear_op.register_fake
def _qlinear_fake(x: torch.Tensor, planes: list[torch.Tensor], type_name: str, out_features: int,
                  in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def qlinear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype."""
    if torch.compiler.is_compiling():
        return _qlinear_op(x, w.plane_list(), w.type_name, *w.shape, bias)
    return _qlinear(x, w, bias)
