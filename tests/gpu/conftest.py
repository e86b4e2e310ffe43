"""tests/gpu needs a CUDA device: everything here is marked `gpu` and skipped
where no device and driver answer (this CPU build machine, CI)."""
from __future__ import annotations

from pathlib import Path

import pytest

GPU_DIR = Path(__file__).resolve().parent


def _cuda_answers() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or no driver: no GPU here
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = _cuda_answers()
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if GPU_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not has_cuda:
                item.add_marker(skip)
