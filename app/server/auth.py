"""The control API's bearer token: made once, kept in AppPaths.token_file (0600).

Why: the control API can pause, unload and reclaim models, so only this user's
own programs (tray, CLI, dashboard) may call it. The token lives in the
runtime dir (0700) in a file only this user can read; anything that can read
it is already this user.

How clients authenticate (the contract the tray, CLI and dashboard build on):

* Programs (tray, CLI, app/control_client.py) read the token file and send
  ``Authorization: Bearer <token>`` on every ``/control/...`` request.
* The dashboard is opened as ``http://127.0.0.1:<port>/dashboard?token=<token>``
  (the tray builds it from the token file: app/control_client.ControlClient.dashboard_url). The daemon checks the
  token, sets the cookie ``ebbtide_token`` (HttpOnly, SameSite=Strict, Path=/)
  and answers ``303 -> /dashboard`` so the token leaves the address bar and
  history. The page then just calls ``fetch("/control/...")`` and
  ``new EventSource("/control/events")`` on its own origin: the cookie rides
  along (EventSource cannot send an Authorization header, hence the cookie).
  Without a valid cookie, control routes answer 401 and the page should say
  "open the dashboard from the tray".
* A foreign web page cannot use the cookie: SameSite=Strict keeps it off
  cross-site requests and app/server/security.py refuses foreign Origins.

The token survives daemon restarts (the file is reused while it is valid) so a
CLI that read it before a restart keeps working. When the daemon is bound to a
non-loopback address, every route except /health needs the token too.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

COOKIE_NAME = "ebbtide_token"
QUERY_NAME = "token"
_MIN_TOKEN_LEN = 32


def ensure_token(token_file: Path) -> str:
    """The token in token_file, made (0600) when missing, short or readable by others."""
    token = _read_private(token_file)
    if token:
        return token
    token = secrets.token_urlsafe(32)
    token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = token_file.with_suffix(".tmp")
    # O_EXCL with mode 0600: the token is never readable by others, not even briefly.
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.replace(tmp, token_file)
    log.info("control token written to %s", token_file)
    return token


def read_token(token_file: Path) -> str | None:
    """The token for clients (tray, CLI, tests); None when the daemon has not made one."""
    return _read_private(token_file)


def _read_private(token_file: Path) -> str | None:
    try:
        stat = token_file.stat()
        if stat.st_mode & 0o077:
            log.warning("%s is readable by others: making a new token", token_file)
            return None
        token = token_file.read_text().strip()
    except OSError:
        return None
    return token if len(token) >= _MIN_TOKEN_LEN else None


def token_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison, so response timing does not leak the token."""
    if not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


def presented_token(headers: dict[str, str], cookies: dict[str, str]) -> str | None:
    """The token a request carries: the bearer header first, else the dashboard cookie."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return cookies.get(COOKIE_NAME)
