"""Typed errors of pulling, copying and deleting models; app/server/errors.py maps them to HTTP."""


class PullError(Exception):
    """Base of every pull/copy/delete error."""


class BadModelName(PullError):
    """The name is not one Ebbtide can fetch or write (HTTP 400); the message says what is."""


class NothingToPull(PullError):
    """The repo or the quant asked for does not exist (HTTP 404); the message lists what does."""


class NotEnoughDisk(PullError):
    """The disk lacks room for the files (HTTP 507); refused before a byte is written."""


class ChecksumMismatch(PullError):
    """A downloaded file's sha256 is not the hub's (HTTP 502); the file was removed."""


class HubUnavailable(PullError):
    """The hub could not be reached or answered an error (HTTP 502)."""


class PullCancelled(PullError):
    """The pull was cancelled (client gone, Ctrl-C); no partial file is left."""


class NotOurs(PullError):
    """The model is in another tool's store: Ebbtide never writes there (HTTP 403)."""
