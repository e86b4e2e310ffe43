"""Many clients at once while the broker pauses, drops and resumes: every request
either finishes or is told "busy" (a typed, temporary error), nothing crashes, and
the engine still answers afterwards."""
from __future__ import annotations

import random
import threading

from engines.errors import EngineBusy
from engines.llamacpp.engine import LlamaCppEngine
from engines.types import FinishReason, GenerateRequest, RequestKind, SamplingParams
from llamacpp_support import default_info, small_config


def test_clients_and_broker_verbs_interleaved() -> None:
    engine = LlamaCppEngine(default_info(), small_config(max_queue=2))
    engine.load()
    outcomes: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(3):
            request = GenerateRequest(kind=RequestKind.COMPLETION, prompt=f"Client {seed} asks {i}:",
                                      sampling=SamplingParams(temperature=0.7, seed=seed, max_tokens=rng.randint(1, 6)))
            try:
                stream = engine.generate(request)
                if rng.random() < 0.3:
                    request.cancel()
                last = list(stream)[-1]
                outcome = last.finish_reason.value
            except EngineBusy:
                outcome = "busy"
            except BaseException as exc:  # anything else is a failure of the engine
                with lock:
                    failures.append(exc)
                return
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(5)]
    for t in threads:
        t.start()
    verbs = [engine.pause, engine.resume, engine.drop_prefixes, engine.trim, engine.memory]
    while any(t.is_alive() for t in threads):
        random.choice(verbs)()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(outcomes) == 15 and set(outcomes) <= {"stop", "length", "cancelled", "busy"}
    assert set(outcomes) - {"busy"}, "no request was served at all"
    last = list(engine.generate(GenerateRequest(kind=RequestKind.COMPLETION, prompt="Still here?",
                                                sampling=SamplingParams(temperature=0, max_tokens=2))))[-1]
    assert last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert not engine.busy
    engine.unload()
