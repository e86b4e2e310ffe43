"""RemoteEngine: the Engine interface over another server's HTTP API.

It holds no memory here, so the broker's verbs give back nothing and loading is
only remembering the remote. A generation is one streamed HTTP request; errors map
to the engines' typed errors: the remote's 400 -> InvalidRequest, 404 ->
ModelNotFound, 429/503 -> EngineBusy, anything else, a refused connection, a
timeout or the remote going away mid-answer -> RemoteUnavailable (HTTP 502 here),
raised from the stream so the route ends it with the dialect's error frame.
A cancelled request closes the connection, which stops the remote's generation.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx

from engines.base import Engine, ModelInfo, ProgressCallback
from engines.config import EngineConfig
from engines.errors import EmbeddingsUnsupported, EngineBusy, InvalidRequest, ModelLoadError, ModelNotFound
from engines.remote.config import RemoteConfig
from engines.remote.dialects import DIALECTS
from engines.remote.errors import RemoteUnavailable
from engines.types import (EmbeddingResult, FinishReason, GenerateRequest, LoadProgress, MemoryReport, ModelState,
                           StreamChunk, Usage)

STATUS_ERRORS = {400: InvalidRequest, 404: ModelNotFound, 422: InvalidRequest, 429: EngineBusy, 503: EngineBusy}


class RemoteEngine(Engine):
    kind = "remote"

    def __init__(self, info: ModelInfo, config: EngineConfig) -> None:
        super().__init__(info)
        self.config = config
        wanted = info.metadata.get("remote")
        remote = next((r for r in config.remotes if r.name == wanted), None)
        if remote is None:
            raise ModelLoadError(f"{info.name}: no remote named {wanted!r} in settings")
        self.remote: RemoteConfig = remote
        self.remote_model = str(info.metadata.get("remote_model", ""))
        self._state = ModelState.UNLOADED
        self._active = 0
        self._idle_since = time.monotonic()
        self._lock = threading.Lock()

    # --- lifecycle: nothing to load here --------------------------------------
    def load(self, progress: ProgressCallback | None = None) -> None:
        self._state = ModelState.LOADED
        if progress:
            progress(LoadProgress(self.info.name, 1.0, "ready"))

    def unload(self) -> int:
        self._state = ModelState.UNLOADED
        return 0

    @property
    def state(self) -> ModelState:
        return self._state

    # --- serving ---------------------------------------------------------------
    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.remote.timeout_s, connect=self.remote.connect_timeout_s)

    def generate(self, request: GenerateRequest) -> Iterator[StreamChunk]:
        make_body, parse = DIALECTS[self.remote.kind]
        path, body = make_body(request, self.remote_model)
        with self._lock:
            self._active += 1
        try:
            yield from self._stream(path, body, parse, request)
        finally:
            with self._lock:
                self._active -= 1
                self._idle_since = time.monotonic()

    def _stream(self, path: str, body: dict, parse, request: GenerateRequest) -> Iterator[StreamChunk]:
        where = f"{self.remote.name} ({self.remote.base_url})"
        finish, usage = None, Usage()
        try:
            with httpx.Client(timeout=self._timeout(), trust_env=False) as http, \
                    http.stream("POST", self.remote.base_url + path, json=body,
                                headers=self.remote.headers()) as response:
                _raise_for_status(response, where)
                for line in response.iter_lines():
                    if request.cancelled.is_set():
                        finish = FinishReason.CANCELLED
                        break
                    piece = parse(line)
                    if piece is None:
                        continue
                    if piece.error:
                        raise RemoteUnavailable(f"remote {where} failed: {piece.error}")
                    if piece.prompt_tokens or piece.completion_tokens:
                        usage = Usage(prompt_tokens=piece.prompt_tokens, completion_tokens=piece.completion_tokens)
                    finish = piece.finish or finish
                    if piece.text:
                        yield StreamChunk(text=piece.text)
        except httpx.TimeoutException as exc:
            raise RemoteUnavailable(f"remote {where} timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise RemoteUnavailable(f"remote {where} went away: {exc or type(exc).__name__}") from exc
        if finish is None:  # the stream ended without saying it was done: cut off
            raise RemoteUnavailable(f"remote {where} ended the answer without finishing it")
        yield StreamChunk(finish_reason=finish, usage=usage)

    def embed(self, texts: list[str]) -> EmbeddingResult:
        path, read = {"openai": ("/v1/embeddings", lambda b: [d["embedding"] for d in b["data"]]),
                      "ollama": ("/api/embed", lambda b: b["embeddings"])}[self.remote.kind]
        where = f"{self.remote.name} ({self.remote.base_url})"
        try:
            response = httpx.post(self.remote.base_url + path, json={"model": self.remote_model, "input": texts},
                                  headers=self.remote.headers(), timeout=self._timeout(), trust_env=False)
        except httpx.HTTPError as exc:
            raise RemoteUnavailable(f"remote {where} went away: {exc}") from exc
        if response.status_code in (400, 404, 501):
            raise EmbeddingsUnsupported(f"{self.info.name}: the remote does not embed ({response.status_code})")
        _raise_for_status(response, where)
        body = response.json()
        return EmbeddingResult(tuple(tuple(v) for v in read(body)), int((body.get("usage") or {}).get(
            "prompt_tokens", body.get("prompt_eval_count", 0)) or 0))

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        raise InvalidRequest(f"{self.info.name} is served remotely: its tokenizer is not here")

    def detokenize(self, token_ids: list[int]) -> str:
        raise InvalidRequest(f"{self.info.name} is served remotely: its tokenizer is not here")

    # --- memory and the broker's verbs: nothing is held here -------------------
    def memory(self) -> MemoryReport:
        return MemoryReport()

    def trim(self) -> int:
        return 0

    def drop_prefixes(self) -> int:
        return 0

    def pause(self) -> int:
        return 0

    def resume(self) -> None:
        pass

    @property
    def busy(self) -> bool:
        return self._active > 0

    @property
    def idle_since(self) -> float:
        return time.monotonic() if self._active else self._idle_since


def _raise_for_status(response: httpx.Response, where: str) -> None:
    if response.status_code < 400:
        return
    response.read()
    text = response.text.strip()[:300]
    error = STATUS_ERRORS.get(response.status_code)
    message = f"remote {where} answered {response.status_code}: {text}"
    raise error(message) if error else RemoteUnavailable(message)
