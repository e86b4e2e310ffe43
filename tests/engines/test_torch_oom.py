"""Out of memory in a step or a load is a temporary error, and the engine stays usable
(issue 15): real TorchEngine on a tiny random-weight Llama, KV in host-backend pages
whose budget is too small for one request; no broker (nothing makes room)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_torch_admission import CFG, PAGE, request, unload_bounded  # noqa: E402

from app.server.errors import Dialect, classify, error_for  # noqa: E402
from engines.base import ModelInfo  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.errors import OutOfMemory  # noqa: E402
from engines.torch.engine import TorchEngine  # noqa: E402
from engines.torch.serve.oom import as_temporary  # noqa: E402
from engines.types import FinishReason  # noqa: E402
from kvcached.config import KvcachedConfig  # noqa: E402
from kvcached.standalone import standalone_pool  # noqa: E402
from kvcached.errors import DeviceOutOfMemory, PoolExhausted, TemporaryError  # noqa: E402


def test_an_allocator_out_of_memory_becomes_a_503_and_others_stay_what_they_are():
    raw = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 MiB\nmore")
    typed = as_temporary(raw, "loading m")
    assert isinstance(typed, OutOfMemory) and typed.__cause__ is raw
    assert "loading m" in str(typed) and "Tried to allocate 32.00 MiB" in str(typed)
    assert classify(typed) == (503, "unavailable_error")
    status, body = error_for(typed, Dialect.OPENAI)
    assert status == 503 and body["error"]["code"] == 503
    page = DeviceOutOfMemory("cuMemCreate: CUDA_ERROR_OUT_OF_MEMORY")
    assert as_temporary(page, "a step") is page and classify(page)[0] == 503
    other = ValueError("not memory")
    assert as_temporary(other, "a step") is other and classify(other)[0] == 500


@pytest.mark.timeout(120)
def test_a_step_out_of_kv_pages_fails_only_its_request_temporarily_and_the_next_runs():
    engine = TorchEngine(ModelInfo(name="tight", path="", source="synthetic", metadata={"config": CFG}),
                         EngineConfig(torch_num_slots=1, torch_max_context=128, torch_prefill_chunk=64,
                                      max_queue=4),
                         standalone_pool(KvcachedConfig(backend="host", page_size=PAGE,
                                                        budget_bytes=PAGE, reserve_pages=0)))
    engine.load()
    try:
        with pytest.raises(TemporaryError) as info:     # 12 + 60 tokens: 3 pages of 32; 1 exists
            list(engine.generate(request(0, max_tokens=60)))
        assert isinstance(info.value, PoolExhausted)
        assert classify(info.value)[0] == 503
        # What the failed sequence mapped goes back (the worker does it right after).
        deadline = time.monotonic() + 10
        while engine.memory().kv_held_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.memory().kv_held_bytes == 0
        # The failed sequence's page went back: 12 + 4 tokens fit in the one page, again
        # and again (one slot: no other slot's cached prefix holds the page meanwhile).
        for i in range(1, 3):
            last = list(engine.generate(request(i, max_tokens=4)))[-1]
            assert last.finish_reason is FinishReason.LENGTH and last.usage.completion_tokens == 4
    finally:
        unload_bounded(engine)
