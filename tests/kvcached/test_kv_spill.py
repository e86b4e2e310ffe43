"""A paused KVCache spilled to disk when the host runs short, and read back bit-exact.

Real parts: the host backend's pages, a real file in a tmp dir. A truncated, a
corrupted and a foreign file are each refused with KVFileRejected: nothing of
them reaches the cache, whose slots are left empty rather than half restored.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_kv_manager import CONFIG, SHAPE, checksum, fill  # noqa: E402

from kvcached.kv_cache import spill_file  # noqa: E402
from kvcached.errors import KVFileRejected  # noqa: E402
from kvcached.kv_cache.manager import KVCache  # noqa: E402
from kvcached.vmm import open_backend  # noqa: E402

SIZES = (200, 1, 77)


@pytest.fixture
def kv():
    with open_backend(CONFIG) as backend, KVCache(backend, SHAPE, max_slots=3, max_context=200,
                                                  config=CONFIG) as cache:
        yield cache


def paused_with_data(kv: KVCache) -> tuple[list[int], list[int]]:
    slots = [kv.acquire_slot() for _ in SIZES]
    for slot, n, seed in zip(slots, SIZES, range(3)):
        kv.ensure(slot, n)
        fill(kv, slot, n, seed)
    kv.layer_kv(slots[0], 0, 1)[0].view(torch.int16).fill_(0x7E01)   # a NaN payload
    crcs = [checksum(kv, s, n) for s, n in zip(slots, SIZES)]
    kv.pause()
    return slots, crcs


def test_spill_frees_the_host_copy_and_resume_reads_it_back_bit_exact(kv, tmp_path):
    slots, crcs = paused_with_data(kv)
    live = sum(SIZES) * SHAPE.token_bytes
    assert kv.paused_host_bytes() == live
    freed = kv.spill(tmp_path)
    [path] = tmp_path.glob(f"*{spill_file.SUFFIX}")
    assert freed >= live and kv._staging.capacity == 0
    assert kv.paused_host_bytes() == 0 and kv.paused_disk_bytes() == live and kv.is_paused
    assert kv.spill(tmp_path) == 0                               # idempotent
    # A paused slot can still be exported (the disk tier at unload): read from the file.
    exported = kv.export_slot(slots[2], SIZES[2])
    assert exported.shape[0] == SIZES[2]
    kv.resume()
    assert not kv.is_paused and not path.exists() and kv.paused_disk_bytes() == 0
    assert [checksum(kv, s, n) for s, n in zip(slots, SIZES)] == crcs


def test_slots_freed_or_shrunk_while_spilled_leave_the_others_bit_exact(kv, tmp_path):
    slots = [kv.acquire_slot() for _ in SIZES]
    for slot, n, seed in zip(slots, SIZES, range(3)):
        kv.ensure(slot, n)
        fill(kv, slot, n, seed)
    first, last_40 = checksum(kv, slots[0], SIZES[0]), checksum(kv, slots[2], 40)
    kv.pause()
    kv.free(slots[1])                      # a slot goes before the spill
    kv.spill(tmp_path)
    kv.ensure(slots[2], 40)                # the last one shrinks after it
    kv.resume()
    assert checksum(kv, slots[0], SIZES[0]) == first and checksum(kv, slots[2], 40) == last_40


def test_a_spill_that_cannot_be_written_keeps_the_kv_in_host_memory(kv, tmp_path):
    slots, crcs = paused_with_data(kv)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    assert kv.spill(blocked) == 0 and kv.paused_host_bytes() > 0
    kv.resume()
    assert [checksum(kv, s, n) for s, n in zip(slots, SIZES)] == crcs


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _foreign(path: Path) -> None:
    other = path.with_name("other")
    spill_file.write(other, {"cache": "someone else", "nbytes": 8}, torch.zeros(8, dtype=torch.uint8))
    shutil.move(other, path)


@pytest.mark.parametrize("damage", [_truncate, _corrupt, _foreign], ids=["truncated", "corrupted", "foreign"])
def test_a_damaged_spill_is_refused_and_nothing_of_it_is_loaded(kv, tmp_path, damage):
    slots, _ = paused_with_data(kv)
    kv.spill(tmp_path)
    [path] = tmp_path.glob(f"*{spill_file.SUFFIX}")
    damage(path)
    with pytest.raises(KVFileRejected) as refused:
        kv.resume()
    assert path.name in str(refused.value)
    assert not path.exists() and not kv.is_paused
    assert all(kv.num_tokens(s) == 0 for s in slots)             # empty, not half restored
    kv.ensure(slots[0], 10)                                      # and usable again
    fill(kv, slots[0], 10, seed=9)
