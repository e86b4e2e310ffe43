"""benchmarks/quant_dp4a.py's token arithmetic: the dp4a estimate swaps the Q4_K tensors'
times only; the Q6_K half of attn_v/ffn_down and the Q6_K head keep the float matvec's."""
from __future__ import annotations

import pytest

from benchmarks import quant_dp4a as bench
from benchmarks import quant_matvec as qm


def test_dp4a_token_estimate_changes_the_q4_k_tensors_only():
    q4 = {shape: {"bytes": 100, "float_us": 2.0, "dp4a_us": 1.0} for shape in bench.SHAPES}
    q6 = {shape: {"bytes": 150, "float_us": 3.0} for shape in (qm.LAYER["attn_v"], qm.LAYER["ffn_down"], qm.HEAD)}
    q6[qm.HEAD]["float_us"] = 10.0
    six_bit = sum(1 for layer in range(qm.N_LAYERS) if qm._more_bits(layer)) * 2   # attn_v and ffn_down
    four_bit = qm.N_LAYERS * len(qm.LAYER) - six_bit
    float_token = bench.q4_k_m_token(q4, q6, 1e12, use_dp4a=False)
    dp4a_token = bench.q4_k_m_token(q4, q6, 1e12, use_dp4a=True)
    assert float_token["matvec_ms"] == pytest.approx((four_bit * 2.0 + six_bit * 3.0 + 10.0) / 1e3)
    assert dp4a_token["matvec_ms"] == pytest.approx((four_bit * 1.0 + six_bit * 3.0 + 10.0) / 1e3)
    assert dp4a_token["weight_gb"] == float_token["weight_gb"] == pytest.approx(
        (four_bit * 100 + six_bit * 150 + 150) / 1e9)
    assert dp4a_token["of_limit"] > float_token["of_limit"]
