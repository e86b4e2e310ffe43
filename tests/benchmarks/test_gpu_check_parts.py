"""Every part of scripts/gpu_check.sh names a benchmark module and test files that exist:
a typo there costs a GPU call (device time is scarce: a call that fails at its first
line still pays the machine's start)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PART = re.compile(r'^\s*\[(\w+)\]="(\d+) (.*)"\s*(?:#.*)?$')


def parts() -> dict[str, str]:
    found = {}
    for line in (ROOT / "scripts" / "gpu_check.sh").read_text().splitlines():
        match = PART.match(line)
        if match:
            found[match.group(1)] = match.group(3)
    return found


def test_every_part_runs_something_that_exists() -> None:
    found = parts()
    assert {"tests", "tests_new", "quant_served_q4km", "cold_start", "cublas_handles", "exhaustion"} <= set(found)
    for name, command in found.items():
        module = re.search(r"-m (benchmarks\.\w+)", command)
        if module:
            path = ROOT / (module.group(1).replace(".", "/") + ".py")
            assert path.is_file(), f"gpu_check part {name}: {path} is missing"
        for test_path in re.findall(r"(tests/gpu\S*)", command):
            assert (ROOT / test_path).exists(), f"gpu_check part {name}: {test_path} is missing"
        assert module or "pytest" in command, f"gpu_check part {name} runs neither a benchmark nor pytest"
