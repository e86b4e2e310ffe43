"""Rotary position embeddings: the frequencies of every scaling kind, and the module.

Each family stores its RoPE differently, and a wrong frequency is silent (the
model still answers, worse past some length), so every kind is here, in one
table, computed as llama.cpp's `ggml_rope_ext` computes it (and as HF does):

- "none" / "linear": theta_i = base^(-2i/rope_dim), divided by the factor;
- "llama3" (Llama 3.1+): Meta's per-wavelength smoothing. GGUFs carry it
  baked as per-frequency divisors (`rope_freqs.weight`): `freq_factors`;
- "yarn" (Qwen, Llama and Mistral long-context files): a ramp between
  interpolated (theta/factor) and extrapolated frequencies over the dims
  ggml's `rope_yarn_corr_dims` picks, and cos/sin scaled by
  mscale = (1 + 0.1 ln factor) * attn_factor;
- "longrope" (Phi-3/3.5/4 "su"): per-frequency divisors, the long set when the
  context served exceeds the original one, else the short set
  (`rope_factors_long/short`; llama.cpp picks by its context size, and so do
  we: `Rotary.fit_context`), cos/sin scaled by attn_factor always.

Partial rotation (Phi-4-mini rotates 96 of 128 dims): only the first
`rope_dim` dims of a head turn, as pairs (i, i + rope_dim/2); the rest pass
through. `rotary.Rotary` returns cos/sin over the whole head with (1, 0)
there; attention.apply_rotary pairs dims by rope_dim. No torch here: the
engine choice reads configs without importing it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass



@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "none", "linear", "llama3", "yarn" or "longrope"."""
    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0          # llama3
    high_freq_factor: float = 4.0         # llama3
    original_max_position: int = 8192     # llama3, yarn, longrope
    beta_fast: float = 32.0               # yarn
    beta_slow: float = 1.0                # yarn
    attn_factor: float = 1.0              # yarn, longrope: multiplies cos and sin
    long_factors: tuple[float, ...] = ()  # longrope divisors [rope_dim/2]
    short_factors: tuple[float, ...] = ()


def base_inv_freq(theta: float, rope_dim: int) -> list[float]:
    return [1.0 / (theta ** (2 * i / rope_dim)) for i in range(rope_dim // 2)]


def _linear(inv: list[float], s: RopeScaling, rope_dim: int, theta: float) -> list[float]:
    return [f / s.factor for f in inv]


def _llama3(inv: list[float], s: RopeScaling, rope_dim: int, theta: float) -> list[float]:
    """Meta's reference (HF `_compute_llama3_parameters`)."""
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = ((s.original_max_position / wavelen - s.low_freq_factor)
                      / (s.high_freq_factor - s.low_freq_factor))
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out


def yarn_corr_dims(rope_dim: int, original_max_position: int, theta: float,
                   beta_fast: float, beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the dims where the ramp starts and ends."""
    def corr_dim(n_rot: float) -> float:
        return rope_dim * math.log(original_max_position / (n_rot * 2 * math.pi)) / (2 * math.log(theta))
    start = math.floor(corr_dim(beta_fast))
    end = math.ceil(corr_dim(beta_slow))
    return max(0.0, start), min(rope_dim - 1.0, end)


def _yarn(inv: list[float], s: RopeScaling, rope_dim: int, theta: float) -> list[float]:
    low, high = yarn_corr_dims(rope_dim, s.original_max_position, theta, s.beta_fast, s.beta_slow)
    out = []
    for i, f in enumerate(inv):
        # ggml's rope_yarn_ramp: 1 keeps the extrapolated (original) frequency
        extrapolate = 1.0 - min(1.0, max(0.0, (i - low) / max(0.001, high - low)))
        out.append(f / s.factor * (1 - extrapolate) + f * extrapolate)
    return out


def _longrope(inv: list[float], s: RopeScaling, rope_dim: int, theta: float) -> list[float]:
    return inv      # divisors are the rotary's to pick (fit_context): they depend on the context


# kind -> inverse frequencies from the unscaled ones
_SCALINGS = {"none": lambda inv, s, d, t: inv, "linear": _linear, "llama3": _llama3,
             "yarn": _yarn, "longrope": _longrope}
SCALING_KINDS = tuple(_SCALINGS)


def scaled_inv_freq(theta: float, rope_dim: int, scaling: RopeScaling) -> list[float]:
    """Inverse frequencies [rope_dim/2] with the scaling applied (longrope: unscaled)."""
    return _SCALINGS[scaling.kind](base_inv_freq(theta, rope_dim), scaling, rope_dim, theta)


def magnitude_scale(scaling: RopeScaling) -> float:
    """What cos and sin are multiplied by (ggml's mscale)."""
    if scaling.kind == "yarn":
        return (1.0 + 0.1 * math.log(scaling.factor)) * scaling.attn_factor if scaling.factor > 1 \
            else scaling.attn_factor
    if scaling.kind == "longrope":
        return scaling.attn_factor
    return 1.0
