"""benchmarks/decode_depth.py reads llama-bench's JSON by depth: generation records only,
keyed by n_depth (records as llama-bench -o json prints them, trimmed to the fields read)."""
from __future__ import annotations

import json

from benchmarks.llama_peer import depth_rates


def test_generation_rates_by_depth() -> None:
    records = [
        {"n_prompt": 0, "n_gen": 64, "n_depth": 512, "avg_ts": 301.5},
        {"n_prompt": 0, "n_gen": 64, "n_depth": 16384, "avg_ts": 190.25},
        {"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 9000.0},    # a prompt test: not decode
    ]
    assert depth_rates(json.dumps(records)) == {512: 301.5, 16384: 190.25}


def test_a_build_without_depths_reads_as_depth_zero() -> None:
    assert depth_rates(json.dumps([{"n_prompt": 0, "n_gen": 64, "avg_ts": 250.0}])) == {0: 250.0}
