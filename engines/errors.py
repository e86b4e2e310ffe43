"""Typed exceptions of the engines; app/ maps them to HTTP statuses in one place."""
from kvcached.errors import FatalError, KvcachedError, TemporaryError


class EngineError(KvcachedError):
    """Base of every engine error."""


class ModelNotFound(EngineError, FatalError):
    """No model by that name in the registry (HTTP 404). `near` holds the closest names."""

    def __init__(self, message: str = "", name: str = "", near: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.name = name
        self.near = near


class ModelLoadError(EngineError, FatalError):
    """The model file could not be read or loaded; the message says why."""


class InvalidRequest(EngineError, FatalError):
    """The request cannot be served as asked (HTTP 400): the message says what to change."""


class ContextOverflow(InvalidRequest):
    """The prompt does not fit the model's context (HTTP 400)."""


class InfillUnsupported(InvalidRequest):
    """Fill-in-the-middle was asked of a model without FIM tokens (HTTP 400)."""


class EmbeddingsUnsupported(InvalidRequest):
    """The engine cannot produce embeddings for this model (HTTP 400)."""


class EngineBusy(EngineError, TemporaryError):
    """The model's request queue is full; retry later (HTTP 503)."""


class OutOfMemory(EngineError, TemporaryError):
    """A load or a step found no device memory (torch's allocator, a CUDA graph pool,
    a KV page): another application holds it. Nothing is left half-done; retry once
    the memory is back (HTTP 503 with Retry-After)."""


class LoadTimeout(EngineError, TemporaryError):
    """The model's load has not finished within its deadline; it goes on in the
    background, and a later request uses it once it is ready (HTTP 503)."""
