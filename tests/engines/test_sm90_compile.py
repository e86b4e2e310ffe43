"""Every Triton kernel the engine launches on the GPU, compiled for sm_90 (the H100) on this CPU.

Why: the other kernel tests run through Triton's interpreter, which checks nothing the GPU
compiler checks (sm90_compile.py says what). Here child processes run the engine's own
launchers (qmatvec, run_kernel, rms_norm, decode_attention, route, ...) on CPU tensors with
every `*_kernel` swapped for a stand-in that keeps the launch instead of running it, so the
kernels are specialized exactly as the launchers specialize them (PDL on where an sm_90 device
turns it on, and off); then each compiles its share of the distinct launches to cubins and
prints one JSON line a launch. Children, because this process has TRITON_INTERPRET=1 and
triton imported.
Each test reports one kernel module: every failing launch with its constexprs and the
compiler's error, and any kernel of the module no launch here reaches.

A child is this module run as `python -m tests.engines.test_sm90_compile [SHARD SHARDS]`
from the repository root, TRITON_INTERPRET unset.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def launched_kernels() -> dict[str, set[str]]:
    """Module -> its @triton.jit functions named *_kernel, everywhere in engines/: the engine's
    name for what it launches (helpers only kernels call are compiled through those)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "engines").rglob("*.py")):
        text = path.read_text()
        if "triton.jit" not in text:
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel")
                    and any("triton.jit" in ast.unparse(d) for d in node.decorator_list)):
                found.setdefault(module, set()).add(node.name)
    return found


KERNELS = launched_kernels()


# The distinct launches take ~80 s to compile on one core: children compile every SHARDS-th each.
SHARDS = 2


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    children = [subprocess.Popen([sys.executable, "-m", "tests.engines.test_sm90_compile", str(shard), str(SHARDS)],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for shard in range(SHARDS)]
    try:
        outputs = [child.communicate(timeout=600) for child in children]
    finally:
        for child in children:
            child.kill()        # nothing where it has exited
    lines = [json.loads(line) for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("{")]
    if lines and "skip" in lines[0]:
        pytest.skip(lines[0]["skip"])
    for child, (_, stderr) in zip(children, outputs):
        assert child.returncode == 0, f"a compiling process failed (exit {child.returncode}):\n{stderr[-4000:]}"
    return lines


@pytest.mark.parametrize("module", sorted(KERNELS), ids=lambda module: module.rsplit(".", 1)[-1])
def test_kernels_compile_for_sm90(compiled: list[dict], module: str) -> None:
    mine = [line for line in compiled if line["module"] == module]
    unreached = sorted(KERNELS[module] - {line["kernel"] for line in mine})
    assert not unreached, f"no launch in test_sm90_compile.py reaches {module}'s {unreached}: add its launcher"
    failures = [f"{line['case']}\n{textwrap.indent(line['error'][-2000:], '    ')}" for line in mine if line["error"]]
    assert not failures, (f"{len(failures)} of {len(mine)} launches of {module} do not compile for sm_90:\n"
                          + "\n".join(failures))


# ---- the child: the launchers run on CPU tensors, each distinct launch compiled ----

@dataclass
class Launch:
    """One kernel launch as a launcher made it: tensors kept as their dtypes."""
    label: str
    kernel: object          # the JITFunction
    args: dict
    constexprs: dict
    options: dict           # num_warps, num_stages

    def key(self) -> tuple:
        """What decides the compiled kernel (an int only by whether it is 1 or a multiple of 16)."""
        kinds = {name: (value if not isinstance(value, int) else "1" if value == 1 else value % 16 == 0)
                 for name, value in self.args.items()}
        return self.kernel.__name__, repr(self.constexprs), repr(self.options), repr(kinds)

    def describe(self) -> str:
        settings = ", ".join(f"{name}={value}" for name, value in {**self.constexprs, **self.options}.items())
        return f"{self.kernel.__name__} <- {self.label}: {settings}"


class Recorder:
    """Stands in for the kernels while launchers run: `with recorder(label, pdl_on): launcher(...)`
    keeps the launches it makes, pdl.options answering as an sm_90 device would (or off)."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self._label = ""

    @contextlib.contextmanager
    def kernels_replaced(self):
        from triton.runtime.jit import JITFunction
        with contextlib.ExitStack() as stack:
            for module_name in KERNELS:
                module = importlib.import_module(module_name)
                for name, fn in list(vars(module).items()):
                    if isinstance(fn, JITFunction) and name.endswith("_kernel"):
                        stack.enter_context(mock.patch.object(module, name, _StandIn(fn, self)))
            yield

    @contextlib.contextmanager
    def __call__(self, label: str, pdl_on: bool = False):
        from engines.torch.kernels import pdl
        self._label, before = label, len(self.launches)
        options = {"USE_PDL": True, "launch_pdl": True} if pdl_on else {"USE_PDL": False}
        with mock.patch.object(pdl, "options", lambda device: dict(options)):
            yield
        assert len(self.launches) > before, f"{label}: the launcher launched no kernel"

    def keep(self, kernel, positional: tuple, keywords: dict) -> None:
        values = {**dict(zip(kernel.arg_names, positional)), **keywords}
        values.pop("launch_pdl", None)           # how to launch, not what to compile
        options = {name: values.pop(name) for name in ("num_warps", "num_stages") if name in values}
        values = {name: value.dtype if isinstance(value, torch.Tensor) else value for name, value in values.items()}
        constexpr = {param.name for param in kernel.params if param.is_constexpr}
        self.launches.append(Launch(self._label, kernel, {n: v for n, v in values.items() if n not in constexpr},
                                    {n: v for n, v in values.items() if n in constexpr}, options))


class _StandIn:
    """kernel[grid](...) that keeps the launch."""

    def __init__(self, kernel, recorder: Recorder) -> None:
        self.kernel, self.recorder = kernel, recorder

    def __getitem__(self, grid):
        return lambda *positional, **keywords: self.recorder.keep(self.kernel, positional, keywords)


def _bf16(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16)


@functools.cache
def _weight(type_name: str, rows: int, k: int):
    from engines.torch.kernels.quant_weight import QuantWeight
    from engines.torch.load.dequant import TORCH_DEQUANT
    block, size, _ = TORCH_DEQUANT[type_name]
    return QuantWeight.from_gguf(torch.zeros((rows, k // block * size), dtype=torch.uint8), type_name, (rows, k))


def _normed(rows: int, width: int, delta: bool):
    from engines.torch.kernels.normed_input import NormedInput
    return NormedInput(_bf16(rows, width), _bf16(rows, width) if delta else None, _bf16(width), 1e-6)


def _ids(n: int):
    return torch.zeros(n, dtype=torch.int64)


def _float_matvec(launch: Recorder) -> None:
    """quant_kernels' matvec at decode's rows of x (qlinear: up to 4, Q8_0 8), gated and normed
    x loads, K split; stacked experts (quant_experts); dequantize; the fused matmul; quant_group."""
    from engines.torch.kernels import quant_experts, quant_group, quant_kernels as qk
    from engines.torch.kernels.quant_decode import TILES
    for t in TILES:
        w, short_k = _weight(t, 4096, 4096), 512 if t.endswith("_K") else 576   # short: a 4-chunk step
        with launch(f"qmatvec {t} M=1", pdl_on=True):
            qk.qmatvec(_bf16(1, 4096), w)
        with launch(f"qmatvec {t} M=1 K={short_k} N=576 bias gated silu"):
            qk.qmatvec(_bf16(1, 2 * short_k), _weight(t, 576, short_k), _bf16(576), gated="silu")
        with launch(f"qmatvec {t} M=1 K={short_k} N=4096 normed x + delta", pdl_on=True):
            qk.qmatvec(_normed(1, short_k, delta=True), _weight(t, 4096, short_k))
        with launch(f"qmatvec {t} M=2 K split in 2 (float32 partials) gated gelu_tanh", pdl_on=True):
            qk.qmatvec(_bf16(2, 8192), w, split=2, gated="gelu_tanh")
        with launch(f"qmatvec {t} M=2 normed x, bias"):
            qk.qmatvec(_normed(2, 4096, delta=False), w, _bf16(4096))
        with launch(f"qmatvec {t} M=3 gated silu", pdl_on=True):
            qk.qmatvec(_bf16(3, 8192), w, gated="silu")
        with launch(f"qmatvec_experts {t} 8 experts, 4 pairs, gated gelu_tanh"):
            quant_experts._launch(_bf16(4, 2048), _weight(t, 8 * 512, 1024), 8, _ids(4), 1, gated="gelu_tanh")
        with launch(f"dequantize {t}"):
            qk.dequantize(w, torch.bfloat16)
        with launch(f"dequantize {t} rows by ids (embedding)"):
            qk.dequantize(w, torch.bfloat16, block_n=1, ids=_ids(3))
    for t in ("Q8_0", "Q4_K", "Q6_K"):
        with launch(f"qmatmul_fused {t} M=64"):
            qk.qmatmul_fused(_bf16(64, 4096), _weight(t, 4096, 4096))
    with launch("qmatvec Q8_0 M=8", pdl_on=True):
        qk.qmatvec(_bf16(8, 4096), _weight("Q8_0", 4096, 4096))
    with launch("qmatvec Q8_0 M=8 normed x + delta"):
        qk.qmatvec(_normed(8, 4096, delta=True), _weight("Q8_0", 4096, 4096))
    # q, k, v of two types: SmolLM2's Q5_0 q, k and Q8_0 v; a Qwen3-1.7B-like Q4_K q, k and Q6_K v
    smol = [_weight("Q5_0", 576, 576), _weight("Q5_0", 192, 576), _weight("Q8_0", 192, 576)]
    qwen = [_weight("Q4_K", 2048, 2048), _weight("Q4_K", 1024, 2048), _weight("Q6_K", 1024, 2048)]
    with launch("qmatvec_group Q5_0, Q5_0, Q8_0 M=1", pdl_on=True):
        quant_group.qmatvec_group(_bf16(1, 576), smol, [None] * 3)
    with launch("qmatvec_group Q5_0, Q5_0, Q8_0 M=2 normed x + delta, biases"):
        quant_group.qmatvec_group(_normed(2, 576, delta=True), smol, [_bf16(576), _bf16(192), _bf16(192)])
    with launch("qmatvec_group Q4_K, Q4_K, Q6_K M=1 normed x", pdl_on=True):
        quant_group.qmatvec_group(_normed(1, 2048, delta=False), qwen, [None] * 3)
    with launch("qmatvec_group Q4_K, Q6_K (two parts) M=4"):
        quant_group.qmatvec_group(_bf16(4, 2048), qwen[1:], [None] * 2)


def _dp4a(launch: Recorder) -> None:
    """quant_dp4a's kernels in both launch shapes at 1 to 8 rows of x, stacked experts, and
    the x quantization (gated, normed) they start with."""
    from engines.torch.kernels import quant_dp4a as qd, quant_experts
    for t in qd.TYPES:
        w = _weight(t, 4096, 4096)
        with launch(f"dp4a {t} M=1 one weight row a program", pdl_on=True):
            qd.run_kernel(_bf16(1, 4096), w, 4096, qd.launch_for(t, 1, 4096), 1)
        with launch(f"dp4a {t} M=1 output head of 128256 rows"):
            qd.run_kernel(_bf16(1, 4096), w, 128256, qd.launch_for(t, 1, 128256), 1)
        for rows, gated, pdl_on in ((2, "silu", True), (4, None, False), (8, "gelu_tanh", True)):
            with launch(f"dp4a {t} M={rows}" + (f" gated {gated}" if gated else ""), pdl_on):
                qd.run_kernel(_bf16(rows, 4096 * (2 if gated else 1)), w, 4096, qd.launch_for(t, rows, 4096), rows,
                              gated=gated)
        with launch(f"qmatvec_experts dp4a {t} 8 experts, 4 pairs, gated silu"):
            quant_experts._launch_dp4a(_bf16(4, 2048), _weight(t, 8 * 512, 1024), 8, _ids(4), 1, gated="silu")
    with launch("quantize_x normed x + delta", pdl_on=True):
        qd.quantize_x(_normed(1, 4096, delta=True))
    with launch("quantize_x normed x"):
        qd.quantize_x(_normed(2, 4096, delta=False))


def _norms_and_activations(launch: Recorder) -> None:
    """fused_small's four kernels at widths from a head (64) to an 8B MLP (14336)."""
    from engines.torch.kernels import fused_small as fs
    for i, width in enumerate((64, 128, 576, 4096, 14336)):
        pdl_on, w = i % 2 == 0, _bf16(width)
        with launch(f"rms_norm width {width}", pdl_on):
            fs.rms_norm(_bf16(2, width), w, 1e-6)
        with launch(f"add_rms_norm width {width}", pdl_on):
            fs.add_rms_norm(_bf16(2, width), _bf16(2, width), w, 1e-6)
        with launch(f"rms_norm_pair width {width}", not pdl_on):
            fs.rms_norm_pair(_bf16(4, width), w, _bf16(2, width), w, 1e-6)
        with launch(f"gated_activation width {width}", not pdl_on):
            fs.gated_activation(_bf16(2, 2 * width), "silu" if pdl_on else "gelu_tanh")


def _attend(launch: Recorder, label: str, heads: int, kv_heads: int, head_dim: int, pdl_on: bool = False,
            dtype=None, cache_dtype=None, rotary: bool = True, split: bool = False, **spec) -> None:
    """decode_attention on q, k, v views of one projection and a token-major cache, as the model has them."""
    from engines.torch.kernels.decode_attention import Pieces, decode_attention
    from engines.torch.model.attention import AttnSpec
    dtype, rows, ctx = dtype or torch.bfloat16, 2, 1024
    q, k, v = torch.zeros(rows, heads + 2 * kv_heads, 1, head_dim, dtype=dtype).split([heads, kv_heads, kv_heads], 1)
    cache = torch.zeros(3, ctx, 2, kv_heads, head_dim, dtype=cache_dtype or dtype)
    k_cache, v_cache = (cache[:, :, i].permute(0, 2, 1, 3) for i in range(2))
    cos = sin = torch.zeros(rows, 1, 1, head_dim) if rotary else None
    pieces = Pieces.for_cache(ctx, rows, kv_heads, torch.device("cpu"), tokens=512) if split else None
    with launch(label, pdl_on):
        decode_attention(q, k, v, torch.zeros(rows, 1, dtype=torch.int64), _ids(rows), k_cache, v_cache, cos, sin,
                         AttnSpec(**spec), pieces)


def _attention(launch: Recorder) -> None:
    _attend(launch, "SmolLM2: 9 heads on 3, head dim 64", 9, 3, 64, pdl_on=True)
    _attend(launch, "SmolLM2 in pieces (flash decoding)", 9, 3, 64, split=True)
    _attend(launch, "llama 8B: 32 heads on 8, head dim 128", 32, 8, 128, pdl_on=True)
    _attend(launch, "llama 8B in pieces", 32, 8, 128, pdl_on=True, split=True)
    _attend(launch, "llama.cpp numerics: float16 cache, q and k rotated before", 32, 8, 128,
            cache_dtype=torch.float16, rotary=False)
    _attend(launch, "Gemma 2: head dim 256, soft-cap, sliding window", 8, 4, 256, pdl_on=True, scale=0.0625,
            softcap=50.0, window=4096)
    _attend(launch, "Gemma 2 in pieces", 8, 4, 256, split=True, softcap=50.0, window=4096)
    _attend(launch, "Phi-3: head dim 96 in a block of 128", 32, 32, 96, pdl_on=True)
    _attend(launch, "partial RoPE: 64 of 128 dims", 16, 2, 128, rope_dim=64)
    _attend(launch, "float32 model (ieee dots)", 4, 2, 64, pdl_on=True, dtype=torch.float32)
    _attend(launch, "float16 model, 32 heads on one", 32, 1, 128, dtype=torch.float16)


def _moe_and_step_inputs(launch: Recorder) -> None:
    from engines.torch.kernels import moe_small, step_inputs
    for experts, k, renormalize in ((16, 1, False), (8, 2, True), (64, 3, True), (60, 6, False), (128, 8, True),
                                    (512, 8, False)):
        with launch(f"route top {k} of {experts}"):
            moe_small.route(torch.zeros(2, experts), k, renormalize)
    for k, dim in ((1, 64), (2, 4096), (3, 576), (6, 2048), (8, 768)):
        with launch(f"combine {k} experts of width {dim}"):
            moe_small.combine(_bf16(2 * k, dim), torch.zeros(2, k))
    for dim, experts in ((2048, 128), (512, 8)):
        with launch(f"router_logits {experts} experts of width {dim}"):
            moe_small.router_logits(_bf16(1, dim), _bf16(experts, dim))
    for rows in (1, 8, 64, 256):
        with launch(f"step_inputs.take {rows} rows"):
            step_inputs.take(torch.zeros(3, rows, dtype=torch.int64), _ids(rows), _ids(rows), _ids(rows))


def _rope(launch: Recorder) -> None:
    """rope_table's cos/sin rows: whole heads of 64, 96 (Phi-3), 128, 256 (Gemma) and a partial RoPE."""
    from engines.torch.kernels.rope_table import rope_table
    for i, (head_dim, rotated) in enumerate(((64, 64), (96, 96), (128, 128), (128, 64), (256, 256))):
        with launch(f"rope_table head dim {head_dim}, {rotated} rotated", pdl_on=i % 2 == 0):
            rope_table(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(rotated // 2), torch.ones(head_dim), head_dim)


def record_launches() -> list[Launch]:
    recorder = Recorder()
    with recorder.kernels_replaced():
        for run_launchers in (_float_matvec, _dp4a, _norms_and_activations, _attention, _rope, _moe_and_step_inputs):
            run_launchers(recorder)
    return recorder.launches


def missing_toolchain() -> str | None:
    """Why kernels cannot be compiled for sm_90 here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"no Triton with its NVIDIA backend here ({exc})"
    try:
        get_ptxas(90)
    except Exception as exc:  # noqa: BLE001 - whatever Triton raises for a missing ptxas
        return f"no ptxas for sm_90 here ({exc})"
    return None


def distinct_launches() -> list[Launch]:
    """The launches recorded, one per compiled kernel (the first launch that needs it names it)."""
    firsts: dict[tuple, Launch] = {}
    for launch in record_launches():
        firsts.setdefault(launch.key(), launch)
    return list(firsts.values())


def compile_all(shard: int, shards: int) -> None:
    """One JSON line a distinct launch of this shard (every shards-th): its module, kernel,
    description and the compiler's error."""
    reason = missing_toolchain()
    if reason:
        print(json.dumps({"skip": reason}))
        return
    from tests.engines.sm90_compile import compile_sm90
    for launch in distinct_launches()[shard::shards]:
        try:
            compile_sm90(launch.kernel, launch.args, launch.constexprs, **launch.options)
            error = None
        except Exception as exc:  # noqa: BLE001 - the compiler's error is the finding
            error = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"module": launch.kernel.__module__, "kernel": launch.kernel.__name__,
                          "case": launch.describe(), "error": error}), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    compile_all(*(map(int, sys.argv[1:3]) if len(sys.argv) > 2 else (0, 1)))
