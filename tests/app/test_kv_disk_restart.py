"""A conversation's cached KV outlives the real daemon: written at shutdown, read at the next load.

The bundled SmolLM2 on the torch engine (CPU, host-backend KV) with keep_kv_on_disk
on; the daemon is stopped with SIGTERM and started again on the same home."""
from __future__ import annotations

BUNDLED = "smollm2:135m-instruct-q4_1"
SETTINGS = f'''
[models."{BUNDLED}"]
engine = "torch"
keep_kv_on_disk = true
'''
PROMPT = "Write one sentence about the sea."


def complete(daemon) -> dict:
    with daemon.client(timeout=300) as client:
        reply = client.post("/v1/completions", json={"model": BUNDLED, "prompt": PROMPT, "max_tokens": 8,
                                                     "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_conversation_survives_restarts_and_a_torn_file_is_refused(start_daemon) -> None:
    first = start_daemon(SETTINGS)
    answer = complete(first)["choices"][0]["text"]
    assert first.stop() == 0
    kv_dir = first.home / "data" / "kv"
    assert len(list(kv_dir.glob("*.kv"))) == 1, first.log()[-2000:]
    assert "kept 1 cached conversation(s) on disk" in first.log()

    again = start_daemon(SETTINGS, home=first.home)
    assert complete(again)["choices"][0]["text"] == answer
    assert "restored 1 cached conversation(s)" in again.log()   # at the load the request made
    assert again.stop() == 0

    (saved,) = kv_dir.glob("*.kv")            # kept again at this shutdown: now tear it
    saved.write_bytes(saved.read_bytes()[:1000])
    third = start_daemon(SETTINGS, home=first.home)
    assert complete(third)["choices"][0]["text"] == answer
    assert "KV file refused and removed" in third.log() and "restored" not in third.log()
