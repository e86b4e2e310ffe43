"""The KV disk tier: bit-exact round trips, and nothing torn, corrupted or foreign ever loaded.

Real files in a tmp dir, real KVCaches on the host backend (pages really mapped)."""
from __future__ import annotations

import logging

import pytest
import torch

from kvcached.config import KvcachedConfig
from kvcached.kv_cache import disk_tier
from kvcached.errors import KVFileForeign, KVFileRejected
from kvcached.kv_cache.disk_tier import DiskTier
from kvcached.kv_cache.layout import KVShape
from kvcached.kv_cache.manager import KVCache
from kvcached.vmm import open_backend

PAGE = 64 * 1024
SHAPE = KVShape(4, 2, 64, "float16")        # 2048 bytes a token
CONFIG = KvcachedConfig(backend="host", page_size=PAGE, reserve_pages=0)
ME = {"model": "tiny.gguf:1234:5678", "kv": [4, 2, 64, "float16"]}


def random_kv(n: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 4, 2, 2, 64), generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_bit_exact(tmp_path, dtype) -> None:
    kv = random_kv(37, dtype)
    disk_tier.write(tmp_path / "a.kv", ME, list(range(37)), kv)
    saved = disk_tier.read(tmp_path / "a.kv", ME)
    assert saved.tokens == list(range(37))
    assert saved.kv.dtype == dtype and torch.equal(saved.kv.view(torch.uint8), kv.view(torch.uint8))


def test_truncated_files_are_refused_wherever_they_end(tmp_path) -> None:
    path = tmp_path / "a.kv"
    size = disk_tier.write(path, ME, list(range(20)), random_kv(20))
    whole = path.read_bytes()
    for cut in (0, 5, 12, 40, size // 2, size - 33, size - 1):
        path.write_bytes(whole[:cut])
        with pytest.raises(KVFileRejected):
            disk_tier.read(path, ME)


def test_a_corrupted_byte_anywhere_is_refused(tmp_path) -> None:
    path = tmp_path / "a.kv"
    size = disk_tier.write(path, ME, list(range(20)), random_kv(20))
    whole = bytearray(path.read_bytes())
    for at in (9, 30, size // 2, size - 1):
        bad = bytearray(whole)
        bad[at] ^= 0x40
        path.write_bytes(bytes(bad))
        with pytest.raises(KVFileRejected):
            disk_tier.read(path, ME)


def test_another_models_file_is_foreign_not_ours(tmp_path) -> None:
    disk_tier.write(tmp_path / "a.kv", ME, [1, 2], random_kv(2))
    with pytest.raises(KVFileForeign):
        disk_tier.read(tmp_path / "a.kv", {**ME, "model": "other.gguf:1:2"})


def test_take_drops_refused_files_with_a_log_line_and_leaves_foreign_ones(tmp_path, caplog) -> None:
    tier = DiskTier(tmp_path, max_bytes=1 << 20)
    tier.put("good", ME, [1, 2, 3], random_kv(3))
    tier.put("theirs", {**ME, "model": "other"}, [4], random_kv(1))
    broken = tier.put("broken", ME, [5, 6], random_kv(2))
    broken.write_bytes(broken.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING, logger="kvcached.kv_cache.disk_tier"):
        taken = tier.take(ME, limit=8)
    assert [s.tokens for s in taken] == [[1, 2, 3]]
    assert "broken.kv" in caplog.text and "refused" in caplog.text
    assert [p.name for p in tier.files()] == ["theirs.kv"]


def test_the_tier_keeps_within_its_bytes_newest_first(tmp_path) -> None:
    one = 10 * SHAPE.token_bytes
    tier = DiskTier(tmp_path, max_bytes=3 * one)
    for i in range(5):
        tier.put(f"c{i}", ME, list(range(10)), random_kv(10, seed=i))
    assert [p.name for p in tier.files()] == ["c4.kv", "c3.kv"]   # a file is a little more than `one`
    assert tier.put("huge", ME, list(range(40)), random_kv(40)) is None


def test_a_slot_exported_live_or_paused_imports_bit_exact(tmp_path) -> None:
    with open_backend(CONFIG) as backend, \
            KVCache(backend, SHAPE, max_slots=2, max_context=200, config=CONFIG) as source:
        slot = source.acquire_slot()
        source.ensure(slot, 45)
        source.slot_tokens(slot, 45).copy_(random_kv(45))
        live = source.export_slot(slot, 45)
        source.pause()
        paused = source.export_slot(slot, 45)
        assert torch.equal(live.view(torch.uint8), paused.view(torch.uint8))
        with KVCache(backend, SHAPE, max_slots=2, max_context=200, config=CONFIG) as target:
            other = target.acquire_slot()
            target.import_slot(other, paused)
            assert target.num_tokens(other) == 45
            assert torch.equal(target.slot_tokens(other, 45).view(torch.uint8), live.view(torch.uint8))
