"""Matrix-vector at decode's batch (1-8 rows) on integer dot products, as llama.cpp's MMVQ does.

Why: the float matvec of `quant_kernels` is instruction-bound, not memory-bound, on
4- and 6-bit types (~10 SASS instructions a weight for Q4_K on sm_90: x's bf16
unpack, nibble extraction, the exponent trick, two FMAs), so an 8B Q4_K_M decode
step ran at 0.63x llama.cpp's CUDA build (benchmarks/results/quant_matvec.json).
Here x is quantized once per call to int8 in blocks of 32 (ggml's q8_1: a float
scale and the block's scaled sum), and one `dp4a` multiplies four weights' quants
by four int8 activations: a 32-bit word of Q4_K quants is 8 weights, two masks and
a shift away from two dp4a operands. Per weight that is ~0.07 warp-instructions
(`dp4a_kernels` says how the tiles are laid out), against ~0.3 for the float path.

Up to 8 rows of x (decode's batch) share each weight load. Types: Q4_K, Q6_K (the
two of a Q4_K_M file), Q4_0 and Q8_0. x's int8 rounding costs accuracy the float
path does not lose (~0.4% of a dot product's scale per block, the error llama.cpp's
CUDA build has too); tests/engines/test_quant_dp4a.py bounds it. Under Triton's
interpreter (the CPU tests) dp4a is emulated bytewise. `chosen` says where qlinear
takes this path: where a weight has rows enough to fill the GPU (quant_dp4a.json).
"""
from __future__ import annotations

import functools
import os

import torch

from engines.torch.kernels import dp4a_kernels, pdl
from engines.torch.kernels.gated_input import gate_code
from engines.torch.kernels.normed_input import NormedInput
from engines.torch.kernels.quant_decode import triton
from engines.torch.kernels.quant_weight import QuantWeight

QK = 32                        # activations per int8 block (ggml's QK8_1)
MAX_ROWS = 8                   # rows of x (decode's batch): the weights are read once for all
# type -> weights per block of its own (a K-quant's super-block)
TYPES = {"Q4_K": 256, "Q6_K": 256, "Q4_0": 32, "Q8_0": 32}
# type -> (rows per program, blocks per step, steps unrolled, warps): rows x blocks x slots
# per block (4 for K-quants, 1 else) = the threads, so each slot is one thread's
# (dp4a_kernels); the launch sweep's best (benchmarks/quant_dp4a.py)
LAUNCH = {"Q4_K": (8, 4, 2, 4), "Q6_K": (4, 8, 1, 4), "Q4_0": (8, 16, 1, 4), "Q8_0": (4, 32, 2, 4)}
# At one row of x (batch-1 decode, the figure users feel) one weight row a program, as
# llama.cpp's mmvq: 4096-row weights then fill the SMs too. The per-shape sweep
# (quant_dp4a_sweep_h100.json, H100) put it first or second on every 8B layer shape, within
# 4% of the best: Q4_K 4096x14336 15.9 us against 29.6 for the float matvec and 4096x4096
# 8.2 against 10.8. Past one row of x the rows of a program share x's loads (with one
# weight row a program, every program re-reads all of x from L2): LAUNCH there.
LAUNCH_ONE_ROW_OF_X = {"Q4_K": (1, 8, 1, 1), "Q6_K": (1, 8, 1, 1), "Q4_0": (1, 128, 1, 4), "Q8_0": (1, 128, 1, 4)}
# The sweep covered layer shapes only; the output head (128,256 rows) read at 0.91 of copy
# bandwidth with LAUNCH (quant_dp4a.json, H200) and keeps it until a sweep says otherwise.
ONE_ROW_LAUNCH_MAX_ROWS = 65536
# Below this many output rows a program per BN rows leaves SMs idle and the float matvec
# (which splits K) wins; at and above it dp4a wins (quant_dp4a.json, H200: Q4_K 14336x4096
# 1.8x, the head 2.1x; 1024x4096 0.4x). Q6_K wins from 4096 rows.
MIN_ROWS = {"Q4_K": 8192, "Q6_K": 4096, "Q4_0": 8192, "Q8_0": 8192}
# At one row of x with LAUNCH_ONE_ROW_OF_X: dp4a wins from 4096 rows for every type; at 1024
# (k/v projections) the two paths are within 15% either way (float ahead but for Q4_K).
ONE_ROW_MIN_ROWS = 4096
BATCH_MIN_ROWS = 4096  # past 2 rows of x the float path re-reads weights or dequantizes them: dp4a wins sooner


def emulated() -> bool:
    """Triton's interpreter (the CPU) runs no PTX: dp4a is computed bytewise there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


QUANTIZE_BLOCKS = 8   # blocks of 32 a program of quantize_x_kernel


def quantize_x(x: torch.Tensor | NormedInput, gated: str | None = None,
               row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [K] -> (int8 [K], float32 dx [K/32], float32 sx [K/32], int32 sums of each 16 [K/16]):
    ggml's quantize_row_q8_1, plus the half-block sums Q6_K's bias of 32 needs. gated: x is
    rows of [gate | up] (2 row values each) and what is quantized is act(gate) * up, K = its
    rows times `row` (gated_input.py: the activation's own launch saved). x a NormedInput:
    what is quantized is its rms_norm(x + delta), rows of its last dim (normed_input.py:
    the norm's own launch saved; `takes_normed` says which widths)."""
    norm = {}
    if isinstance(x, NormedInput):
        if not takes_normed(x.shape[-1]):
            raise ValueError(f"quantize_x: rows of {x.shape[-1]} are not whole programs of "
                             f"{QK * QUANTIZE_BLOCKS} for the norm read in place")
        row = x.shape[-1]
        norm = x.kernel_args()
        norm["dl_ptr"] = norm.pop("delta")
        x = x.x
    k = x.numel() // 2 if gated else x.numel()
    blocks = triton.cdiv(k, QK)
    q = torch.empty(blocks * QK, dtype=torch.int8, device=x.device)
    dx = torch.empty(blocks, dtype=torch.float32, device=x.device)
    sx = torch.empty(blocks, dtype=torch.float32, device=x.device)
    s16 = torch.empty(blocks * 2, dtype=torch.int32, device=x.device)
    dp4a_kernels.quantize_x_kernel[(triton.cdiv(blocks, QUANTIZE_BLOCKS),)](
        x.reshape(-1), q, dx, sx, s16, k, row or k, BLOCKS=QUANTIZE_BLOCKS, GATE=gate_code(gated),
        **pdl.options(x.device), **norm)
    return q, dx, sx, s16


def takes_normed(width: int) -> bool:
    """Whether quantize_x reads a norm of rows this wide in place (each program inside one row)."""
    return width % (QK * QUANTIZE_BLOCKS) == 0


@functools.lru_cache(maxsize=None)
def _cuda_has_dp4a(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (6, 1)


def device_has_dp4a(device: torch.device) -> bool:
    """The kernels' `dp4a` is PTX: NVIDIA from sm_61 on. A ROCm build of torch runs Triton
    on AMD GPUs with no PTX (device type "cuda" there too): those keep the float path."""
    if device.type != "cuda":
        return emulated()                     # the CPU runs the kernels only in the interpreter
    return torch.version.hip is None and _cuda_has_dp4a(device.index if device.index is not None
                                                          else torch.cuda.current_device())


def supports(w: QuantWeight, rows_of_x: int) -> bool:
    if triton is None or w.type_name not in TYPES or not 1 <= rows_of_x <= MAX_ROWS:
        return False
    return w.shape[1] % TYPES[w.type_name] == 0 and device_has_dp4a(w.device)


def chosen(w: QuantWeight, rows_of_x: int) -> bool:
    """Whether qlinear should take this path: served, and N large enough for it to win."""
    return supports(w, rows_of_x) and w.shape[0] >= min_rows(w.type_name, rows_of_x)


def min_rows(type_name: str, rows_of_x: int) -> int:
    """The fewest output rows at which this path beats the float matvec (the constants say where from)."""
    if rows_of_x == 1:
        return ONE_ROW_MIN_ROWS
    return MIN_ROWS[type_name] if rows_of_x <= 2 else BATCH_MIN_ROWS


def launch_for(type_name: str, rows_of_x: int, rows_of_w: int) -> tuple[int, int, int, int]:
    """(rows per program, blocks per step, steps unrolled, warps) for this many rows of x and of W."""
    one_row = rows_of_x == 1 and rows_of_w <= ONE_ROW_LAUNCH_MAX_ROWS
    return (LAUNCH_ONE_ROW_OF_X if one_row else LAUNCH)[type_name]


def _weight_args(w: QuantWeight) -> list:
    """The planes of w as the type's kernel reads them (words where it reads words), then strides."""
    p = w.planes
    words = {name: t.view(torch.int32) for name, t in p.items() if name in ("qs", "ql", "qh")}
    if w.type_name == "Q4_K":
        planes = [words["qs"], p["dm"].view(torch.int32), p["scales"].view(torch.int32)]
    elif w.type_name == "Q6_K":
        planes = [words["ql"], words["qh"], p["scales"].view(torch.int32), p["d"]]
    else:
        planes = [words["qs"], p["d"]]
    return planes + [t.stride(0) for t in planes]


def qmatvec_dp4a(x: torch.Tensor | NormedInput, w: QuantWeight, block_n: int | None = None,
                 blocks_per_step: int | None = None, unroll: int | None = None, num_warps: int | None = None,
                 gated: str | None = None) -> torch.Tensor:
    """x [M, K] (M <= 8; or [K]) -> [M, N] in x's dtype; W in Q4_K, Q6_K, Q4_0 or Q8_0 planes.
    gated: x is [M, 2K] = [gate | up] and the product is with act(gate) * up. x a NormedInput:
    the product is with its norm, quantized as it is read (quantize_x)."""
    normed = x if isinstance(x, NormedInput) else None
    x2 = (x.x if normed is not None else x).reshape(-1, 2 * w.shape[1] if gated else w.shape[1])
    if not supports(w, x2.shape[0]):
        raise ValueError(f"the dp4a matvec serves {sorted(TYPES)} at 1 to {MAX_ROWS} rows of x, not "
                         f"{w.type_name} {tuple(w.shape)} at {tuple(x.shape)}")
    m, n = x2.shape[0], w.shape[0]
    launch = tuple(given or default for given, default in
                   zip((block_n, blocks_per_step, unroll, num_warps), launch_for(w.type_name, m, n)))
    return run_kernel(x2, w, n, launch, m, gated=gated,
                      quantized=None if normed is None else quantize_x(normed))


def run_kernel(x2: torch.Tensor, w: QuantWeight, n: int, launch: tuple[int, int, int, int], out_rows: int,
               gated: str | None = None, out: torch.Tensor | None = None,
               quantized: tuple[torch.Tensor, ...] | None = None, **indexed) -> torch.Tensor:
    """The type's kernel over x2's rows (quantized here, in one flat pass: rows of whole
    blocks; or `quantized`, quantize_x's result for x2, shared by two weights that read the
    same x) and n rows of W -> [out_rows, n], into `out` where given (rows of unit column
    stride: a slice of a wider buffer). `indexed` (ids_ptr, x_div, INDEXED=True:
    quant_experts.py): stacked experts, one program column and output row per pair."""
    block_n, blocks_per_step, unroll, warps = launch
    m = 1 if indexed else x2.shape[0]
    xq, dx, sx, s16 = quantized or quantize_x(x2.contiguous().reshape(-1), gated, w.shape[1])
    if out is None:
        out = torch.empty((out_rows, n), dtype=x2.dtype, device=x2.device)
    kernel = getattr(dp4a_kernels, f"{w.type_name.lower()}_kernel")
    kernel[(triton.cdiv(n, block_n), out_rows if indexed else 1)](
        out, *_weight_args(w), xq.view(torch.int32), dx, sx, s16, m, n, w.shape[1] // TYPES[w.type_name],
        out.stride(0), BM=triton.next_power_of_2(m), BN=block_n, SB=blocks_per_step, UNROLL=unroll,
        EMULATE=emulated(), num_warps=warps, **(indexed or pdl.options(x2.device)))
    return out
