"""The Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Qwen2/2.5, Mistral).

RMSNorm, RoPE (with linear and llama3 scaling), GQA attention on
`scaled_dot_product_attention`, SwiGLU MLP, tied embeddings, Qwen2's QKV bias:
all chosen by `ModelConfig` fields, one class for the whole family. Parameter
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

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch.model.attention import KVAccess
from engines.torch.model.configs import ModelConfig, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 as llama.cpp and HF do: bf16 sums of squares drift.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """cos/sin computed from positions on the fly: no table sized to the context,
    and positions may be anything the serving side chooses (prefix reuse)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv = torch.tensor(rope_inv_freq(cfg), dtype=torch.float32)
        self.register_buffer("inv_freq", inv, persistent=False)

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        """llama3-scaled GGUFs carry per-frequency divisors (rope_freqs.weight)."""
        self.inv_freq = self.inv_freq / factors.to(self.inv_freq.device, torch.float32)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.unsqueeze(-1).float() * self.inv_freq    # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)       # [B, 1, T, D]
        return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)

        self.qkv_proj: nn.Linear | None = None     # set by fuse(): one GEMM instead of three

    def fuse(self) -> None:
        self.qkv_proj = _fused_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv_width = self.num_kv * self.head_dim
        return self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, kv: KVAccess) -> torch.Tensor:
        bsz, t, _ = x.shape
        q, k, v = self.project(x)
        q = q.reshape(bsz, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(bsz, t, self.num_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(bsz, t, self.num_kv, self.head_dim).transpose(1, 2)
        out = self.attend(q, k, v, cos, sin, positions, kv)             # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, t, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, positions: torch.Tensor, kv: KVAccess) -> torch.Tensor:
        """RoPE, then attention over the cache. RoPE is the KVAccess's to apply here:
        the GPU decode kernel rotates q and k in place."""
        return kv.attend_rotary(self.layer, q, k, v, positions, cos, sin)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gate_up_proj: nn.Linear | None = None   # set by fuse()

    def fuse(self) -> None:
        self.gate_up_proj = _fused_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side."""
    weight = torch.cat([p.weight for p in parts], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, kv: KVAccess) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_eps)


class LlamaModel(nn.Module):
    """Build on the `meta` device and load weights with `load_weights` (loaders
    do that), or use engines.torch.model.synthetic for random weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.rotary = Rotary(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVAccess,
                logit_index: torch.Tensor | None = None) -> torch.Tensor:
        kv.begin(positions)
        x = self.model.embed_tokens(input_ids)                        # [B, T, dim]
        cos, sin = self.rotary(positions)
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, kv)
        if logit_index is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x[rows, logit_index].unsqueeze(1)                      # [B, 1, dim]
        return self.lm_head(self.model.norm(x)).float()               # [B, T|1, V]

    def fuse_projections(self) -> LlamaModel:
        """Merge q/k/v and gate/up into one GEMM each (7 -> 4 per layer): fewer,
        larger kernels for decode on GPU. Same math; parameter names change, so
        call it after loading, never before. Returns self."""
        for layer in self.model.layers:
            if layer.self_attn.qkv_proj is None:
                layer.self_attn.fuse()
                layer.mlp.fuse()
        return self

    def weight_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device | str,
                dtype: torch.dtype) -> LlamaModel:
    """A model whose parameters are exactly `state` (HF names), on device/dtype.
    Built on `meta` first so no memory is spent on throwaway initial weights."""
    from engines.errors import ModelLoadError

    with torch.device("meta"):
        model = LlamaModel(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelLoadError(f"weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    params = {k: nn.Parameter(state[k].to(device=device, dtype=dtype), requires_grad=False)
              for k in expected}
    for name, param in params.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = getattr(module, attr).shape
        if param.shape != shape:
            raise ModelLoadError(f"tensor {name}: shape {tuple(param.shape)}, expected {tuple(shape)}")
        setattr(module, attr, param)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = Rotary(cfg).to(device)
    return model.eval()
