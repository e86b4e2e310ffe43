"""The host monitor reads real /proc; PSI parsing on real-format text."""
from __future__ import annotations

import pytest

from kvcached.broker.monitor import open_monitor
from kvcached.broker.monitor_host import HostMonitor, read_pressure
from kvcached.errors import BackendUnavailable
from kvcached.rss import meminfo_bytes


def test_host_monitor_counts_others_without_ours():
    held = 512 << 20
    s = HostMonitor(lambda: held).sample()
    assert s.total_bytes == meminfo_bytes("MemTotal")
    assert 0 < s.free_bytes <= s.total_bytes
    assert s.ours_bytes == held
    assert s.others_bytes == max(0, s.total_bytes - s.free_bytes - held)


def test_read_pressure(tmp_path):
    psi = tmp_path / "memory"
    psi.write_text("some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n"
                   "full avg10=1.00 avg60=0.00 avg300=0.00 total=4\n")
    assert read_pressure(psi) == 12.5
    assert read_pressure(tmp_path / "missing") is None
    psi.write_text("garbage\n")
    assert read_pressure(psi) is None


def test_open_monitor_by_backend():
    assert open_monitor("host", 0, lambda: 0).name == "host"
    with pytest.raises(BackendUnavailable):
        open_monitor("tpu", 0, lambda: 0)


def test_nvml_without_a_driver_is_a_typed_error():
    from kvcached.vmm import cuda_available

    if cuda_available():
        pytest.skip("a CUDA driver answers here: tests/gpu covers NVML")
    from kvcached.broker.monitor_nvml import NvmlMonitor
    with pytest.raises(BackendUnavailable):
        NvmlMonitor(0, lambda: 0)
