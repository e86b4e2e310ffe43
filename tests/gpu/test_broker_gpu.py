"""The broker yielding to a real second process on the GPU.

This process holds 4 GiB of KV (3 GiB of finished sequences, 1 GiB live and
idle) watched by the NVML monitor. A child process (torch) allocates device
memory 256 MiB at a time, retrying on out-of-memory as an application does,
until it holds more than was free when it started. It can only get there if
the broker gives back our KV (trim first, pause if needed); the live
sequence then comes back bit-exact once the child is gone."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from kvcached.broker import Broker, ClientSpec
from kvcached.broker.monitor_nvml import NvmlMonitor
from kvcached.config import KvcachedConfig
from kvcached.kv_cache.layout import KVShape
from kvcached.kv_cache.manager import KVCache
from kvcached.kv_cache.verbs import KVCacheVerbs
from kvcached.vmm import open_backend

MiB, GiB = 1 << 20, 1 << 30
SHAPE = KVShape(32, 8, 128, torch.bfloat16)     # Llama-3.1-8B: 128 KiB a token
TOKENS = 8192                                   # 1 GiB a slot

CHILD = textwrap.dedent("""
    import sys, time, torch
    target, chunk = int(sys.argv[1]), 256 << 20
    held, start, deadline = [], time.monotonic(), time.monotonic() + 60
    while sum(t.numel() for t in held) < target and time.monotonic() < deadline:
        try:
            held.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            time.sleep(0.002)
    ok = sum(t.numel() for t in held) >= target
    print("OK" if ok else "FAIL", time.monotonic() - start, flush=True)
    sys.stdin.read()          # hold the memory until the parent has looked
""")


def test_broker_yields_device_memory_to_another_process():
    config = KvcachedConfig(backend="cuda", page_size=2 * MiB, reserve_pages=0,
                            headroom_bytes=GiB, monitor_interval_s=0.01)
    backend = open_backend(config)
    kv = KVCache(backend, SHAPE, max_slots=4, max_context=TOKENS, config=config)
    slots = [kv.acquire_slot() for _ in range(4)]
    for slot in slots:
        kv.ensure(slot, TOKENS)
    live = slots[0]
    block = kv.slot_tokens(live, TOKENS).view(torch.int16)
    block.copy_(torch.randint(-32768, 32767, block.shape, dtype=torch.int16, device="cuda"))
    reference = block.clone()                      # the bytes the live sequence must keep
    for slot in slots[1:]:
        kv.free(slot)
    verbs = KVCacheVerbs(kv)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_at_start = torch.cuda.mem_get_info()[0]
    broker = Broker(config, NvmlMonitor(0, verbs.held_bytes), pool=kv.pool)
    broker.register(ClientSpec("llama"), verbs)
    target = free_at_start + GiB                     # more than was free: needs our KV
    with broker:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(target)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline().split()
            held_during = kv.held_bytes()
        finally:
            child.stdin.close()
            child.wait(60)
    assert line and line[0] == "OK", f"the other process never got its memory: {line}"
    steps = {e.step for e in broker.events.recent() if e.bytes_returned}
    assert "trim" in steps, broker.events.recent()
    assert held_during <= 2 * GiB
    kv.resume()                                       # the other process is gone
    assert torch.equal(kv.slot_tokens(live, TOKENS).view(torch.int16), reference)
    assert kv.num_tokens(live) == TOKENS
    kv.close()
    backend.close()


@pytest.fixture(autouse=True)
def _no_leftover_memory():
    yield
    torch.cuda.empty_cache()


def test_nvml_monitor_sees_our_pages_come_and_go():
    config = KvcachedConfig(backend="cuda", page_size=2 * MiB, reserve_pages=0)
    backend = open_backend(config)
    kv = KVCache(backend, SHAPE, max_slots=1, max_context=TOKENS, config=config)
    monitor = NvmlMonitor(0, kv.held_bytes)
    before = monitor.sample()
    assert before.total_bytes > before.free_bytes > 0
    kv.ensure(kv.acquire_slot(), TOKENS)                # 1 GiB
    during = monitor.sample()
    assert before.free_bytes - during.free_bytes >= GiB * 0.9
    assert during.ours_bytes >= GiB * 0.9               # NVML per process, or our count
    kv.free(0)
    assert kv.trim() == GiB
    after = monitor.sample()
    assert after.free_bytes - during.free_bytes >= GiB * 0.9
    monitor.close()
    kv.close()
    backend.close()
