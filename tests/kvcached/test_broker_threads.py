"""Clients mapping and writing KV while the broker trims and pauses them, at once,
on real host-backend pages: nothing a step wrote is ever lost or changed."""
from __future__ import annotations

import random
import threading
import time
import zlib


from kvcached.broker import Broker, ClientSpec
from kvcached.broker.monitor_host import HostMonitor
from kvcached.config import KvcachedConfig
from kvcached.kv_cache.layout import KVShape
from kvcached.kv_cache.manager import KVCache
from kvcached.kv_cache.verbs import KVCacheVerbs
from kvcached.page_pool import PagePool
from kvcached.vmm import open_backend

PAGE = 64 * 1024
SHAPE = KVShape(2, 2, 32, "float32")     # 1 KiB a token: 64 tokens a page
CONFIG = KvcachedConfig(backend="host", page_size=PAGE, reserve_pages=2, headroom_bytes=0)
ROUNDS = 30


def write(kv: KVCache, slot: int, start: int, end: int, seed: int) -> None:
    for layer in range(SHAPE.num_layers):
        k, v = kv.layer_kv(slot, layer, end)
        k[:, start:end] = seed + layer
        v[:, start:end] = -(seed + layer)


def crc(kv: KVCache, slot: int, n: int) -> int:
    out = 0
    for layer in range(SHAPE.num_layers):
        for t in kv.layer_kv(slot, layer, n):
            out = zlib.crc32(t.contiguous().numpy().tobytes(), out)
    return out


def worker(verbs: KVCacheVerbs, seed: int, errors: list) -> None:
    kv, rng = verbs.kv, random.Random(seed)
    try:
        for r in range(ROUNDS):
            slot = kv.acquire_slot()
            n = rng.randint(1, 300)
            with verbs.step():
                kv.ensure(slot, n)
                write(kv, slot, 0, n, seed * 1000 + r)
                expect = crc(kv, slot, n)
            time.sleep(0.001)                      # idle: the broker may trim or pause now
            with verbs.step():                     # resumes if paused
                assert crc(kv, slot, n) == expect, "live KV changed between steps"
                grow = min(500, n + rng.randint(1, 200))
                kv.ensure(slot, grow)
                write(kv, slot, n, grow, seed)
                assert crc(kv, slot, n) == expect, "growing changed earlier tokens"
            kv.free(slot)
    except BaseException as exc:  # reported to the main thread
        errors.append(exc)


def test_clients_map_while_the_broker_reclaims():
    backend = open_backend(CONFIG)
    pool = PagePool(backend, CONFIG)
    caches = [KVCache(pool, SHAPE, max_slots=2, max_context=500, config=CONFIG) for _ in range(3)]
    verbs = [KVCacheVerbs(kv) for kv in caches]
    broker = Broker(CONFIG, HostMonitor(lambda: 0), pool=pool)
    for i, v in enumerate(verbs):
        broker.register(ClientSpec(f"c{i}", priority=i), v)
    errors: list = []
    threads = [threading.Thread(target=worker, args=(v, i + 1, errors)) for i, v in enumerate(verbs)]
    for t in threads:
        t.start()
    reclaimed = 0
    while any(t.is_alive() for t in threads):
        reclaimed += broker.reclaim()              # every step, on every idle client
        time.sleep(0.0005)                         # a broker acts between samples, not nonstop
    for t in threads:
        t.join()
    assert not errors, errors
    steps = {e.step for e in broker.events.recent() if e.bytes_returned}
    assert reclaimed > 0 and {"trim", "pause"} <= steps, steps
    for kv in caches:
        kv.close()
    pool.close()
    backend.close()
