"""Real external pressure on the host backend: a child process allocates and
touches RAM until MemAvailable falls under the broker's headroom; the broker
gives KV pages back and this process's RSS really falls. Then the paused
sequence comes back bit-exact."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import zlib

import torch

from kvcached.broker import Broker, ClientSpec
from kvcached.config import KvcachedConfig
from kvcached.kv_cache.layout import KVShape
from kvcached.kv_cache.manager import KVCache
from kvcached.kv_cache.verbs import KVCacheVerbs
from kvcached.rss import meminfo_bytes, rss_bytes, rss_shmem_bytes
from kvcached.vmm import open_backend

MiB = 1 << 20
SHAPE = KVShape(30, 3, 64, "float16")      # SmolLM2-135M: 22.5 KiB a token
TOKENS = 3000                               # ~66 MiB a sequence
MARGIN = 256 * MiB                          # headroom sits this far under MemAvailable at start
CHILD_CAP = 2048 * MiB                      # the child never takes more than this

# The child grows in 64 MiB steps, touching every page (np.full writes them),
# until the parent creates the stop file or it reaches its cap; then it waits.
CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    stop, cap = sys.argv[1], int(sys.argv[2])
    held = []
    while not os.path.exists(stop):
        if sum(a.nbytes for a in held) < cap:
            held.append(np.full(64 << 20, 1, dtype=np.uint8))
            print(sum(a.nbytes for a in held), flush=True)
        time.sleep(0.02)
""")


def checksum(kv: KVCache, slot: int, n: int) -> int:
    return zlib.crc32(kv.slot_tokens(slot, n).view(torch.int16).numpy().tobytes())


def test_child_pressure_makes_the_broker_give_memory_back(tmp_path):
    config = KvcachedConfig(backend="host", reserve_pages=0, headroom_bytes=0, monitor_interval_s=0.02)
    backend = open_backend(config)
    kv = KVCache(backend, SHAPE, max_slots=3, max_context=TOKENS, config=config)
    verbs = KVCacheVerbs(kv)
    slots = [kv.acquire_slot() for _ in range(3)]
    for slot in slots:
        kv.ensure(slot, TOKENS)                   # pages are mapped populated: RSS rises now
    live = slots[0]
    block = kv.slot_tokens(live, TOKENS).view(torch.int16)
    block.copy_(torch.randint(-32768, 32767, block.shape, dtype=torch.int16))
    crc = checksum(kv, live, TOKENS)
    for slot in slots[1:]:
        kv.free(slot)                             # finished: trimmable
    held_before, live_before = kv.held_bytes(), kv.live_bytes()
    shmem_before, rss_before = rss_shmem_bytes(), rss_bytes()
    assert shmem_before >= held_before * 0.9

    headroom = meminfo_bytes("MemAvailable") - MARGIN
    broker_config = KvcachedConfig(backend="host", headroom_bytes=headroom, monitor_interval_s=0.02)
    broker = Broker(broker_config, pool=kv.pool)
    broker.register(ClientSpec("smollm2"), verbs)
    stop = tmp_path / "stop"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(stop), str(CHILD_CAP)],
                             stdout=subprocess.PIPE, text=True)
    try:
        with broker:
            deadline = time.monotonic() + 60
            while kv.held_bytes() > 0 and time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.05)
            shmem_after, rss_after = rss_shmem_bytes(), rss_bytes()
            stop.touch()
    finally:
        stop.touch()
        child.wait(30)
    events = [e for e in broker.events.recent() if e.bytes_returned]
    assert events and all(e.reason == "pressure" for e in events)
    assert {e.step for e in events} >= {"trim", "pause"}, events
    assert kv.held_bytes() == 0 and kv.is_paused
    # Every mapped page went back; on the host backend the paused sequence's bytes
    # now sit in the staging buffer, so the whole RSS falls by the rest.
    assert shmem_before - shmem_after >= held_before * 0.8
    assert rss_before - rss_after >= (held_before - live_before) * 0.8
    kv.resume()                                               # pressure gone: it grows back
    assert checksum(kv, live, TOKENS) == crc
    kv.close()
    backend.close()
