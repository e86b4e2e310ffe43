"""The broker never calls an engine's verb while holding its lock (issue 15).

The deadlock found on the GPU, reproduced on the host backend with real parts
(a TorchEngine on a tiny random-weight Llama, kvcached host pages, the real
Broker): the broker picks an idle model to unload and, holding its reclaim
lock, calls the model's unload(); a request arrives just then, and the model's
worker asks the broker for its KV (Broker.admit), which waits for that lock;
unload() waits for the request in flight to end. Neither moves again. The
verbs below make the request arrive exactly in that window.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_torch_admission import make_broker, make_engine, request, unload_bounded  # noqa: E402

from engines.broker_client import EngineVerbs  # noqa: E402
from engines.types import FinishReason  # noqa: E402
from kvcached.broker import ClientSpec, Step  # noqa: E402
from kvcached.broker.watchdog import all_stacks  # noqa: E402

BOUND_S = 90.0   # far more than the few steps the request takes (a loaded 2-core CI box); a deadlock never ends


class RequestArrivesDuringTheVerb(EngineVerbs):
    """The engine's verbs, with a request sent in the window between the broker's
    decision and the verb's work (what a busy editor does by chance)."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.results: list[object] = []
        self.reader: threading.Thread | None = None

    def _arrive(self) -> None:
        stream = self.engine.generate(request(0, max_tokens=4))
        self.reader = threading.Thread(target=lambda: self.results.append(list(stream)[-1]),
                                       daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 5
        while not self.engine.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)   # the worker is in Broker.admit by now

    def unload(self) -> int:
        self._arrive()
        return super().unload()

    def pause(self) -> int:
        self._arrive()
        return super().pause()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("step", [Step.UNLOAD, Step.PAUSE])
def test_a_request_arriving_while_the_broker_reclaims_its_model_does_not_hang(step):
    engine = make_engine("victim")
    broker = make_broker(None)
    verbs = RequestArrivesDuringTheVerb(engine)
    handle = broker.register(ClientSpec("victim"), verbs)
    engine.attach_broker(handle)
    reclaim = threading.Thread(target=lambda: broker.reclaim(client="victim", steps=[step]),
                               daemon=True)
    try:
        reclaim.start()
        reclaim.join(BOUND_S)
        if reclaim.is_alive():   # where each thread waits, for whoever reads the failure
            print(all_stacks())
        assert not reclaim.is_alive(), "the broker's reclaim and the model's admission deadlocked"
        verbs.reader.join(BOUND_S)
        assert not verbs.reader.is_alive()
    finally:
        engine.attach_broker(None)
        broker.unregister(handle)
        broker.close()
        unload_bounded(engine)
    (last,) = verbs.results
    # The request either ran (the verb waited for it) or was told to retry; never lost silently.
    assert not isinstance(last, BaseException) or "retry" in str(last).lower(), last
    if not isinstance(last, BaseException):
        assert last.finish_reason is FinishReason.LENGTH and last.usage.completion_tokens == 4
