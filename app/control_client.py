"""A small client of the daemon's control API, for the CLI and the tray.

It finds the daemon (the endpoint the instance lock names, else the one the
settings name), reads the bearer token from the runtime dir (again after a 401,
since a daemon that just started may have written a new one), and turns
failures into three typed errors: the daemon is not there, it refused, or it
answered with an error status.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx

from app.instance_lock import holder
from app.paths import AppPaths
from app.server.auth import read_token
from app.settings import Settings

log = logging.getLogger(__name__)


class ControlError(Exception):
    """The daemon answered with an error status; status and message say which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message


class DaemonNotRunning(Exception):
    """Nothing answers at the endpoint."""


def endpoint_for(paths: AppPaths, settings: Settings) -> str:
    """Where the running daemon is: what its lock says, else what the settings say."""
    info = holder(paths.lock_file)
    return info.endpoint if info and info.endpoint else settings.endpoint_url


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)


class ControlClient:
    def __init__(self, base_url: str, token_file: Path, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_file = token_file
        self._token: str | None = None
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, trust_env=False)

    @classmethod
    def from_settings(cls, paths: AppPaths, settings: Settings, timeout_s: float = 10.0) -> "ControlClient":
        return cls(endpoint_for(paths, settings), paths.token_file, timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------
    def _headers(self, fresh: bool = False) -> dict[str, str]:
        if fresh or self._token is None:
            self._token = read_token(self.token_file)
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def request(self, method: str, path: str, body: dict | None = None) -> dict | list:
        try:
            response = self._http.request(method, path, json=body, headers=self._headers())
            if response.status_code == 401:  # the daemon may have made a new token since
                response = self._http.request(method, path, json=body, headers=self._headers(fresh=True))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise DaemonNotRunning(f"no Ebbtide daemon answers at {self.base_url}") from exc
        except httpx.HTTPError as exc:
            raise ControlError(0, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise ControlError(response.status_code, _error_message(response))
        return response.json() if response.content else {}

    # --- the control API ---------------------------------------------------
    def status(self) -> dict:
        return self.request("GET", "/control/status")

    def models(self) -> list[dict]:
        body = self.request("GET", "/control/models")
        return body.get("models", []) if isinstance(body, dict) else body

    def memory(self) -> dict:
        return self.request("GET", "/control/memory")

    def model_action(self, name: str, action: str) -> dict:
        """action: pause | weights_to_host | resume | reclaim | unload."""
        return self.request("POST", f"/control/models/{quote(name, safe='')}/{action}")

    def reclaim_all(self) -> dict:
        return self.request("POST", "/control/reclaim")

    def set_auto_yield(self, enabled: bool) -> dict:
        return self.request("POST", "/control/auto-yield", {"enabled": enabled})

    def is_alive(self) -> bool:
        try:
            self.status()
            return True
        except (DaemonNotRunning, ControlError):
            return False

    def dashboard_url(self) -> str:
        token = self._token or read_token(self.token_file) or ""
        return f"{self.base_url}/dashboard?token={quote(token)}"

    def events(self, stop: threading.Event | None = None) -> Iterator[dict]:
        """Follow /control/events (server-sent events), one dict per event, until stop is set."""
        try:
            with self._http.stream("GET", "/control/events", headers=self._headers(fresh=True),
                                   timeout=httpx.Timeout(10.0, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ControlError(response.status_code, _error_message(response))
                yield from _parse_sse(response.iter_lines(), stop)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise DaemonNotRunning(f"no Ebbtide daemon answers at {self.base_url}") from exc


def _parse_sse(lines: Iterator[str], stop: threading.Event | None) -> Iterator[dict]:
    """Server-sent events: `event:`/`data:` lines, a blank line ends one event."""
    kind, data = "", []
    for line in lines:
        if stop is not None and stop.is_set():
            return
        if line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif not line and data:
            try:
                event = json.loads("\n".join(data))
            except ValueError:
                event = {"data": "\n".join(data)}
            if isinstance(event, dict):
                event.setdefault("kind", kind or "message")
                yield event
            kind, data = "", []
