"""What can go wrong talking to a remote server, typed for app/server/errors.py."""
from engines.errors import EngineError
from kvcached.errors import TemporaryError


class RemoteUnavailable(EngineError, TemporaryError):
    """The remote could not be reached, timed out, went away mid-answer or failed (HTTP 502)."""
