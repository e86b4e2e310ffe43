"""Where programmatic dependent launch (engines/torch/kernels/pdl.py) is asked for: never on
the CPU, under Triton's interpreter or on ROCm; on NVIDIA from sm_90; off when forced off.
A kernel launched with it and one without it compute the same (tests/gpu/test_pdl_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import pdl


@pytest.fixture(autouse=True)
def _by_device():
    yield
    pdl.set_enabled(None)
    pdl._device_has_pdl.cache_clear()


def test_the_cpu_and_the_interpreter_launch_plainly(monkeypatch):
    assert pdl.options(torch.device("cpu")) == {"USE_PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.supported(torch.device("cuda", 0))


@pytest.mark.parametrize(("capability", "hip", "expected"), [
    ((9, 0), None, True), ((12, 0), None, True), ((8, 9), None, False), ((9, 4), "6.4", False)])
def test_nvidia_from_sm_90_only(monkeypatch, capability, hip, expected):
    if pdl.triton is None:
        pytest.skip("no Triton here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    device = torch.device("cuda", 0)
    assert pdl.supported(device) is expected
    want = {"USE_PDL": True, "launch_pdl": True} if expected else {"USE_PDL": False}
    assert pdl.options(device) == want
    pdl.set_enabled(False)
    assert pdl.options(device) == {"USE_PDL": False}
