"""benchmarks/weights_tier.py measures what it says on a tiny random-weight GGUF (CPU, host
backend): every rung gives memory back and the model answers after each, the weights'
round trip is timed against a raw copy of as many bytes, the reload is the slow one."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
from tiny_gguf import TINY, random_state, write_tiny_gguf  # noqa: E402

from benchmarks import weights_tier  # noqa: E402


def test_every_rung_on_a_tiny_model(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, TINY, random_state(TINY))
    result = weights_tier.measure(path, "tiny", prompt_tokens=40)
    rungs = {row["rung"]: row for row in result["rungs"]}
    assert list(rungs) == ["pause", "weights_to_host", "unload"]
    assert all(row["given_back_bytes"] > 0 and row["next_token_s"] > 0 for row in result["rungs"])
    assert rungs["weights_to_host"]["given_back_bytes"] >= result["weights_bytes"]
    assert rungs["unload"]["given_back_bytes"] >= result["weights_bytes"]
    assert result["raw_pinned_d2h_gbps"] > 0 and result["to_host_x_raw"] > 0 and result["restore_x_raw"] > 0
    assert result["reload_over_weights_rung"] > 1
