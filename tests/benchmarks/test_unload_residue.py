"""benchmarks/unload_residue.py without a GPU: each variant's fresh process fails at the
CUDA backend, and the run still writes its table and JSON, the failure named per
variant (on the lent GPU a variant that breaks must not lose the others' figures)."""
from __future__ import annotations

import json
import sys

from benchmarks import unload_residue


def test_a_variant_that_fails_is_reported_and_the_run_is_written(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["unload_residue", "--variants", "eager", "--timeout-s", "120"])
    unload_residue.main()
    written = json.loads((tmp_path / "unload_residue.json").read_text())
    eager = written["variants"]["eager"]
    assert "CUDA" in eager["error"] or "cuInit" in eager["error"]
    assert written["unit"].startswith("MiB")
