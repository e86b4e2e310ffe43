"""The decoder, assembled for every family the torch engine serves (Llama 2/3,
SmolLM2, Mistral, Mixtral, Qwen2/2.5, Qwen3, Qwen3-MoE, Gemma 2/3, Phi-3/3.5/4,
StarCoder2).

Pieces live one concept a file: norms.py (RMSNorm, LayerNorm), rotary.py and
rope.py (RoPE of every scaling kind), self_attention.py (projections, q/k
norms), attention.py (attention over the cache, AttnSpec), mlp.py (gated and
plain MLPs), moe.py (top-k routing over stacked experts). `ModelConfig`
fields choose them; this file only wires a layer (plain pre-norm, or Gemma's
sandwich of norms) and the model (embedding scale, local and global RoPE,
final soft-cap). Parameter
names follow Hugging Face (`model.layers.N.self_attn.q_proj.weight`...), so a
safetensors folder loads as is and the GGUF loader maps onto the same names.
Weights are in HF layout: the GGUF loader undoes llama.cpp's Q/K permutation,
so RoPE here is always the "rotate half" (NeoX) form.

The forward interface (the contract with the serving side, engines/torch/
scheduler & co.):

    logits = model(input_ids, positions, kv, logit_index=None)

    input_ids   [B, T] int64   new tokens of B sequences (T=1 for decode)
    positions   [B, T] int64   absolute position of each token = its KV index
    kv          KVAccess       engines.torch.model.attention: per layer, rotates q and
                               k (RoPE), writes the new k/v at `positions` and
                               attends over the cache
                               (history 0..p-1 must already be there)
    logit_index [B] int64 | None
                               None: logits for every token [B, T, V];
                               else: only column logit_index[b] of each row,
                               [B, 1, V] (prefill wants the last real token only)
    returns     float32 logits

The model holds no state between calls and allocates no KV: the serving side
owns the cache (kvcached virtual tensors) and its KVAccess decides how rows map
to cache regions (see attention.py for padding and masking rules). Call under
torch.inference_mode(). Nothing in forward syncs with the host except what the
KVAccess does (ContiguousKV reads max(position) unless given a fixed read_len),
so a decode step can be captured in a CUDA graph.

`model.fuse_projections()` (after loading) merges q/k/v and gate/up into one
GEMM each for GPU decode; the math and the interface stay the same.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engines.torch.model.attention import KVAccess
from engines.torch.model.configs import ModelConfig
from engines.torch.model.mlp import MLP, PlainMLP
from engines.torch.model.moe import SparseMoE
from engines.torch.model.norms import RMSNorm, add_then_norm, make_norm
from engines.torch.model.projections import linear_on
from engines.torch.model.rope import RopeScaling
from engines.torch.model.rotary import Rotary
from engines.torch.model.self_attention import Attention

__all__ = ["Attention", "DecoderLayer", "LlamaModel", "MLP", "RMSNorm", "Rotary", "build_model"]


def make_mlp(cfg: ModelConfig) -> nn.Module:
    if cfg.num_experts:
        return SparseMoE(cfg)
    return MLP(cfg) if cfg.gated_mlp else PlainMLP(cfg)


class DecoderLayer(nn.Module):
    """Pre-norm residual block. With sandwich norms (Gemma 2/3) the attention and MLP
    outputs are normed again before their residual adds; HF names then read:
    input_layernorm -> attn -> post_attention_layernorm -> + ; pre_feedforward_layernorm
    -> mlp -> post_feedforward_layernorm -> +. Without: post_attention_layernorm is
    the norm before the MLP (Llama's name for it)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        self.input_layernorm = make_norm(cfg.norm, cfg.dim, cfg.rms_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.dim, cfg.rms_eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(cfg.norm, cfg.dim, cfg.rms_eps)
            self.post_feedforward_layernorm = make_norm(cfg.norm, cfg.dim, cfg.rms_eps)
        self.mlp = make_mlp(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                kv: KVAccess, pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, addend): the residual stream before this layer's last add, and what
        that add adds. The caller adds it inside the next norm (the next layer's, or the
        final one): add and norm are one launch in an eager step on the GPU (norms.add_then_norm).
        `pending`: the previous layer's addend (None for the first layer)."""
        # defer: the projections after a norm read it themselves where they can (normed_input.py)
        x, h = add_then_norm(self.input_layernorm, x, pending, defer=True)
        attn = self.self_attn(h, cos, sin, positions, kv)
        mlp_defers = getattr(self.mlp, "TAKES_NORMED", False)
        if not self.sandwich:
            x, h = add_then_norm(self.post_attention_layernorm, x, attn, defer=mlp_defers)
            return x, self.mlp(h)
        x, h = add_then_norm(self.pre_feedforward_layernorm, x, self.post_attention_layernorm(attn),
                             defer=mlp_defers)
        return x, self.post_feedforward_layernorm(self.mlp(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.rms_eps)


def make_rotaries(cfg: ModelConfig) -> tuple[Rotary, Rotary | None]:
    """The global layers' RoPE, and the sliding layers' where it differs (Gemma 3:
    base 10000, without the file's scaling)."""
    rotary = Rotary(cfg.head_dim, cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_context)
    if not any(cfg.is_local(i) for i in range(cfg.num_layers)):
        return rotary, None
    return rotary, Rotary(cfg.head_dim, cfg.rotary_dim, cfg.rope_theta_local, RopeScaling())


class LlamaModel(nn.Module):
    """Build on the `meta` device and load weights with `load_weights` (loaders
    do that), or use engines.torch.model.synthetic for random weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.rotary, self.rotary_local = make_rotaries(cfg)
        self.is_local = [cfg.is_local(i) for i in range(cfg.num_layers)]
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # The final norm's weight: always a dense tensor of the compute dtype, where the
    # embedding may be a QuantEmbedding (engines.torch.quant).
    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def fit_context(self, max_context: int) -> None:
        """The context this model will serve: LongRoPE picks its factors by it."""
        self.rotary.fit_context(max_context)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor,
               kv: KVAccess) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, addend) after the last layer, [B, T, dim] each: their sum is the hidden
        state the final norm reads (DecoderLayer.forward says why it stays apart)."""
        kv.begin(positions)
        x = self.model.embed_tokens(input_ids)                        # [B, T, dim]
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        rope = self.rotary(positions)
        rope_local = self.rotary_local(positions) if self.rotary_local is not None else rope
        pending = None
        for layer, is_local in zip(self.model.layers, self.is_local):
            x, pending = layer(x, *(rope_local if is_local else rope), positions, kv, pending)
        return x, pending

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVAccess,
                logit_index: torch.Tensor | None = None) -> torch.Tensor:
        x, pending = self.hidden(input_ids, positions, kv)
        if logit_index is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x[rows, logit_index].unsqueeze(1)                      # [B, 1, dim]
            pending = pending[rows, logit_index].unsqueeze(1)
        _, normed = add_then_norm(self.model.norm, x, pending, defer=True)
        logits = linear_on(self.lm_head, normed).float()              # [B, T|1, V]
        if self.cfg.final_softcap:
            logits = self.cfg.final_softcap * torch.tanh(logits / self.cfg.final_softcap)
        return logits

    def fuse_projections(self) -> LlamaModel:
        """Merge q/k/v and gate/up into one GEMM each (7 -> 4 per layer): fewer,
        larger kernels for decode on GPU. Same math; parameter names change, so
        call it after loading, never before. Quantized projections were fused by the
        loader where their types match (engines.torch.load.gguf_quant); the rest
        stay apart. Returns self."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def weight_bytes(self) -> int:
        """Bytes the weights hold where they live: dense parameters, quantized blocks
        (QuantWeight.nbytes), and on the CPU the dequantized copies QuantLinear keeps."""
        from engines.torch.quant.modules import quant_cache_bytes, quant_weights

        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total + sum(w.nbytes() for w in quant_weights(self)) + quant_cache_bytes(self)


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device | str,
                dtype: torch.dtype, quant: dict[str, Any] | None = None) -> LlamaModel:
    """A model whose parameters are exactly `state` (HF names), on device/dtype,
    and whose weights named in `quant` (name -> QuantWeight, on device already)
    stay quantized (engines.torch.quant.adopt). Built on `meta` first so no
    memory is spent on throwaway initial weights. A tensor missing, left over or
    of the wrong shape is a ModelLoadError: a tensor the model does not take
    means it would compute something else."""
    from engines.errors import ModelLoadError
    from engines.torch.quant.adopt import adopt

    with torch.device("meta"):
        model = LlamaModel(cfg)
    try:
        quantized = adopt(model, quant or {}, dtype)
    except (ValueError, AttributeError) as exc:
        raise ModelLoadError(f"quantized weights do not fit the {cfg.arch} model: {exc}") from None
    tied_dense = cfg.tie_embeddings and "lm_head.weight" not in quantized
    expected = {k for k in model.state_dict() if not (tied_dense and k == "lm_head.weight")} - quantized
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelLoadError(f"weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    extra = sorted(state.keys() - expected - quantized - {"lm_head.weight"})
    if extra:
        raise ModelLoadError(f"{len(extra)} tensors that the {cfg.arch} model does not take, e.g. {extra[:3]}")
    params = {k: nn.Parameter(state[k].to(device=device, dtype=dtype), requires_grad=False)
              for k in expected}
    for name, param in params.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = getattr(module, attr).shape
        if param.shape != shape:
            raise ModelLoadError(f"tensor {name}: shape {tuple(param.shape)}, expected {tuple(shape)}")
        setattr(module, attr, param)
    if tied_dense:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary, model.rotary_local = (None if r is None else r.to(device) for r in make_rotaries(cfg))
    return model.eval()
