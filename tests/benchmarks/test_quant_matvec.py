"""benchmarks/quant_matvec.py's token arithmetic: the Q4_K_M mix follows llama.cpp's
use_more_bits, and the per-token estimate adds every layer's tensors and the head."""
from __future__ import annotations

import pytest

from benchmarks import quant_matvec as qm


def test_q4_k_m_mix_gives_half_the_layers_six_bits():
    more = [layer for layer in range(qm.N_LAYERS) if qm._more_bits(layer)]
    # first and last eighth, and every third layer between them (llama.cpp llama-quant.cpp)
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_token_estimate_adds_layers_and_head():
    per_type = {t: {f"{n}x{k}": {"bytes": n * k // 2, 1: {"matvec_us": 1.0}} for n, k in qm.SHAPES}
                for t in ("Q4_K", "Q6_K")}
    per_type["Q6_K"][f"{qm.HEAD[0]}x{qm.HEAD[1]}"][1]["matvec_us"] = 10.0
    est = qm.token_estimate(per_type, 1e12, dict.fromkeys(qm.LAYER, "Q4_K"), "Q6_K")
    assert est["matvec_ms"] == pytest.approx((qm.N_LAYERS * len(qm.LAYER) * 1.0 + 10.0) / 1e3)
    layer_bytes = sum(n * k // 2 for n, k in qm.LAYER.values())
    assert est["weight_bytes"] == qm.N_LAYERS * layer_bytes + qm.HEAD[0] * qm.HEAD[1] // 2
    assert abs(est["of_limit"] - est["limit_ms"] / est["matvec_ms"]) < 1e-12
