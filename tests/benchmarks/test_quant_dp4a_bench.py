"""benchmarks/quant_dp4a.py's arithmetic: the 8B Q4_K_M token it times is llama.cpp's mix
(Q6_K for attn_v/ffn_down in the use_more_bits layers and for the head, Q4_K elsewhere),
and every launch it sweeps gives each thread exactly one slot."""
from __future__ import annotations

from benchmarks import quant_dp4a as bench
from benchmarks import quant_matvec as qm


def test_the_token_is_llama_cpps_q4_k_m_mix():
    mix = bench.token_mix()
    six_bit = sum(1 for layer in range(qm.N_LAYERS) if qm._more_bits(layer)) * 2   # attn_v and ffn_down
    assert len(mix) == qm.N_LAYERS * len(qm.LAYER) + 1
    assert sum(t == "Q6_K" for t, _ in mix) == six_bit + 1
    assert mix[-1] == ("Q6_K", qm.HEAD)
    assert {shape for _, shape in mix} == set(qm.LAYER.values()) | {qm.HEAD}


def test_each_swept_launch_fills_its_warps_with_one_slot_a_thread():
    for type_name, slots in bench.SLOTS.items():
        launches = bench.launches(type_name)
        assert len(launches) >= 8 and min(rows for rows, *_ in launches) == 1
        for rows, blocks, unroll, warps in launches:
            assert rows * blocks * slots == 32 * warps and unroll in (1, 2)
            assert unroll == 1 or rows >= 4
