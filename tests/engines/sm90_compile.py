"""Compile a Triton kernel for sm_90 (the H100) on a machine with no GPU.

Why: the CPU tests run the kernels through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which runs their Python semantics but checks nothing the GPU compiler
checks: that every `tl.arange` range is a power of 2, that types and layouts line up in
the MLIR lowering, and that the PTX assembles for sm_90 (dp4a's inline asm, programmatic
dependent launch's griddepcontrol). A kernel can pass every interpreter test and still fail
to build on the first GPU it meets. Triton lowers a kernel all the way to a cubin here,
ptxas included, so test_sm90_compile.py builds the engine's kernels that way.

TRITON_INTERPRET must be unset before triton is first imported (@triton.jit builds the
interpreter's functions otherwise): import this in a process of its own.
"""
from __future__ import annotations

import inspect

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int8: "*i8",
                 torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64"}
DIVISIBLE_BY_16 = [["tt.divisibility", 16]]


def _arg_type(value) -> str:
    """Triton's type of an example argument: a tensor or torch dtype is a pointer to such
    elements, an int i32, a float fp32, a string a type as Triton spells it ("*bf16", "i64")."""
    if isinstance(value, torch.Tensor):
        value = value.dtype
    if isinstance(value, torch.dtype):
        return POINTER_TYPES[value]
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        return "i32"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, str):
        return value
    raise TypeError(f"no Triton type for the example argument {value!r}")


def _divisible_by_16(value, arg_type: str) -> bool:
    """What a launch marks divisible by 16: every pointer (torch allocates 256-byte aligned)
    and ints that are multiples of 16 (strides: the loads vectorize on it)."""
    return arg_type.startswith("*") or (type(value) is int and value % 16 == 0)


def compile_sm90(fn: triton.runtime.jit.JITFunction, args: dict, constexprs: dict | None = None,
                 num_warps: int = 4, **options) -> bytes:
    """fn compiled for sm_90 -> its cubin; raises the compiler's error where it fails.

    args: argument name -> an example value (a tensor or torch dtype for a pointer, an int,
    a float) or a Triton type string; constexprs: name -> value. A parameter in neither takes
    its default, as a launch that leaves it out does. Specialized as a launch specializes:
    None and an int 1 are compiled in, pointers and ints that are multiples of 16 marked
    divisible by 16, except the parameters fn says not to specialize."""
    constants = dict(constexprs or {})
    signature, attrs = {}, {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr or name in constants:
            value = constants.get(name, param.default)
        else:
            value = args.get(name, param.default)
        if value is inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__}: no value for {name}")
        specialized = not param.do_not_specialize
        if param.is_constexpr or name in constants or value is None or (
                specialized and type(value) is int and value == 1):
            signature[name], constants[name] = "constexpr", value
            continue
        signature[name] = _arg_type(value)
        if specialized and _divisible_by_16(value, signature[name]):
            attrs[(param.num,)] = DIVISIBLE_BY_16
    source = ASTSource(fn, signature, constants, attrs)
    return triton.compile(source, target=SM90, options={"num_warps": num_warps, **options}).asm["cubin"]
