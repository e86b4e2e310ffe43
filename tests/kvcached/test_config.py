"""KvcachedConfig: the page size by backend when none is set (issue 15), validation."""
from __future__ import annotations

import pytest

from kvcached.config import DEFAULT_PAGE_SIZES, KvcachedConfig
from kvcached.errors import ConfigError
from kvcached.page_pool import PagePool
from kvcached.vmm import open_backend

MiB = 1 << 20


def test_default_page_size_is_32_mib_on_the_gpu_and_2_mib_on_the_host():
    config = KvcachedConfig()
    assert DEFAULT_PAGE_SIZES == {"cuda": 32 * MiB, "host": 2 * MiB}
    assert config.page_size_for("cuda") == 32 * MiB and config.page_size_for("host") == 2 * MiB
    assert KvcachedConfig(page_size=8 * MiB).page_size_for("cuda") == 8 * MiB   # a setting wins


def test_the_host_backend_and_its_pool_take_the_host_default():
    config = KvcachedConfig(backend="host", budget_bytes=8 * MiB, reserve_pages=0)
    with open_backend(config) as backend, PagePool(backend, config) as pool:
        assert backend.zero_page_size == 2 * MiB and pool.page_size == 2 * MiB


@pytest.mark.parametrize("bad", [0, -MiB, 100_000])
def test_a_bad_page_size_names_the_key(bad):
    with pytest.raises(ConfigError, match="page_size"):
        KvcachedConfig(page_size=bad)
