"""Typed exceptions of kvcached.

Temporary conditions (retry, reclaim, queue) are separated from fatal ones
(bad configuration, no backend) so callers branch on type, never on text.
The HTTP layer maps these to status codes in one place.
"""


class KvcachedError(Exception):
    """Base of every error kvcached raises."""


class TemporaryError(KvcachedError):
    """Retrying later, or after a reclaim, can succeed."""


class FatalError(KvcachedError):
    """Retrying the same call cannot succeed."""


class PoolExhausted(TemporaryError):
    """The page budget is spent: reclaim, wait, or queue the request."""


class DeviceOutOfMemory(TemporaryError):
    """The device itself had no room for a new physical page (CUDA_ERROR_OUT_OF_MEMORY,
    or ENOMEM on the host). Ordinary and recoverable: nothing was mapped."""


class AdmissionDenied(TemporaryError):
    """The broker could not make room for a client's request within the budget."""


class DoesNotFit(FatalError):
    """A load can never fit: more than the budget (or the device, less the headroom)
    holds, even with every other client given back to its pinned minimum."""


class VmmError(FatalError):
    """A virtual-memory driver call failed. `code` names the driver error
    (for example "CUDA_ERROR_INVALID_VALUE" or "EINVAL")."""

    def __init__(self, call: str, code: str, detail: str = "") -> None:
        self.call = call
        self.code = code
        message = f"{call} failed: {code}"
        super().__init__(f"{message} ({detail})" if detail else message)


class BackendUnavailable(FatalError):
    """The requested VMM backend cannot run here (no CUDA device, not Linux...)."""


class ClosedError(FatalError):
    """A backend, pool or virtual tensor was used after close()."""


class ConfigError(FatalError):
    """A configuration value is invalid; the message names the key."""


class InvalidArgument(FatalError, ValueError):
    """A caller passed a value out of range (a slot, a layer, a token count);
    the message names the argument. Also a ValueError for generic callers."""


class WindowMoved(InvalidArgument):
    """A slot cannot continue at this token: its sliding layers' keys the token reads
    were given back (kv_cache/window.py). The caller recomputes from token 0."""


class KVFileRejected(KvcachedError):
    """A KV file (disk tier or spill) that must not be loaded; the message says why."""


class KVFileForeign(KVFileRejected):
    """A whole file, but another model's (or another KV layout's): not ours to load or remove."""
