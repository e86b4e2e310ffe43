"""llama.cpp tensor names -> the model's Hugging Face names, per family. No torch here:
the engine choice reads a file's tensor list with it (unknown tensors route a model
to llama.cpp) without importing torch.

One base table (the Llama layout every family starts from) and each family's
differences (CONVENTIONS 7). The same llama.cpp name can mean different
modules: `ffn_norm` is Llama's post_attention_layernorm (before the MLP) but
Gemma's pre_feedforward_layernorm, whose post_attention_layernorm is llama.cpp's
`post_attention_norm` (after attention, before the residual add).
"""
from __future__ import annotations

import re

# Per-layer short name -> HF module path (the .weight/.bias suffix is kept).
_BASE_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",                   # the router [E, dim]
    "ffn_gate_exps": "mlp.experts.gate_proj",     # stacked experts [E, ffn, dim]
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",     # [E, dim, ffn]
}
_GEMMA = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
FAMILY_LAYER_NAMES: dict[str, dict[str, str]] = {
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "phi3": {"ffn_up": "mlp.gate_up_proj"},       # [2 * ffn, dim]: gate rows first
    "starcoder2": {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
}
# Tensors that configure RoPE rather than hold weights: the loader reads them apart.
ROPE_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})
# Tensors some converters left in files that nothing reads (llama.cpp ignores them too).
_IGNORED_LAYER = frozenset({"attn_rot_embd"})

_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """llama.cpp tensor name -> HF name; None for tensors the model does not take."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m is None:
        return None
    short = m.group(2)
    module = FAMILY_LAYER_NAMES.get(arch, {}).get(short) or _BASE_LAYER.get(short)
    if module is None:
        return None
    return f"model.layers.{m.group(1)}.{module}.{m.group(3)}"


def unknown_tensors(names: list[str] | set[str], arch: str) -> list[str]:
    """Tensors of a file that no module of the torch model takes: a layout it does not
    implement (old per-expert Mixtral files, vision towers, MLA...). Sorted."""
    out = []
    for name in names:
        if name in ROPE_TENSORS or hf_name(name, arch) is not None:
            continue
        m = _LAYER_RE.match(name)
        if m is not None and m.group(2) in _IGNORED_LAYER:
            continue
        out.append(name)
    return sorted(out)
