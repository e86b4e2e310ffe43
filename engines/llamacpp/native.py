"""Small helpers over llama.cpp's C API that llama-cpp-python's wrappers get wrong or lack.

- llama.cpp's log goes to Python logging (logger "engines.llamacpp.native"),
  not straight to stderr: the daemon's log, not the terminal, gets it.
- A token's text as bytes of the right length (`_internals.token_to_piece`
  returns its whole 32-byte buffer, NUL padding included).
"""
from __future__ import annotations

import ctypes
import logging
import threading

import llama_cpp

log = logging.getLogger(__name__)

# ggml_log_level (NONE, DEBUG, INFO, WARN, ERROR) -> logging level; llama.cpp's INFO chatter
# (every tensor, every buffer) goes to DEBUG. CONT (5) continues the previous line.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_route_lock = threading.Lock()
_callback_holder: list[object] = []   # keeps the ctypes callback alive for the process


def route_native_logs() -> None:
    """Send llama.cpp's log lines to Python logging. Idempotent."""
    with _route_lock:
        if _callback_holder:
            return
        last_level = [logging.DEBUG]

        @llama_cpp.llama_log_callback
        def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            py_level = last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
            last_level[0] = py_level
            if log.isEnabledFor(py_level):
                log.log(py_level, "%s", text.decode("utf-8", errors="replace").rstrip("\n"))

        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
        _callback_holder.append(on_log)


def token_piece(vocab: llama_cpp.llama_vocab_p, token: int, special: bool = False) -> bytes:
    """The bytes of one token (a piece of UTF-8, possibly split mid-character)."""
    size = 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
    if n < 0:   # the piece is longer than the buffer: -n is its length
        size = -n
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
    return buf.raw[:max(n, 0)]


_default_params_lock = threading.Lock()


def plain_llama(model_path: str, **kwargs: object) -> "llama_cpp.Llama":
    """A `llama_cpp.Llama` (the high-level class tests and benchmarks use as the
    reference) with `use_extra_bufts` really off. `Llama(..., use_extra_bufts=False)`
    drops the keyword silently and builds its params from
    `llama_model_default_params()`, so on a CPU with AMX it segfaults in decode;
    here the default params it reads have the flag off for the construction."""
    import llama_cpp.llama_cpp as bindings   # the module llama.py reads the defaults from

    original = bindings.llama_model_default_params

    def defaults_without_extra_bufts():
        params = original()
        params.use_extra_bufts = False
        return params

    with _default_params_lock:
        bindings.llama_model_default_params = defaults_without_extra_bufts
        try:
            return llama_cpp.Llama(model_path=str(model_path), **kwargs)
        finally:
            bindings.llama_model_default_params = original
