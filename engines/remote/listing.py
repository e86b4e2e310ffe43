"""The remote servers' models as registry entries: prefix + the remote's own name, source "remote".

Listed with a short timeout; a remote that does not answer is logged and left out,
never an error for the local models listed beside it. RemoteCatalog keeps each
remote's last list and fetches on its own threads: the registry rescans often
(after a miss, on routes that run on the event loop), and a remote that hangs must
not stall it. Lists are fetched when the catalog is made (daemon start); only the
very first read waits for that, at most list_timeout_s; later reads answer from the
last list and refresh it in the background once it is older than list_every_s. A
listing under way is never started twice, so a remote that lists through this
daemon (one pointing back at us) costs one timed-out listing, not a loop.
"""
from __future__ import annotations

import logging
import threading
import time

import httpx

from engines.base import ModelInfo
from engines.remote.config import RemoteConfig

log = logging.getLogger(__name__)

# kind -> (path of the model list, how to read the names out of its JSON)
LISTS = {
    "openai": ("/v1/models", lambda body: [m["id"] for m in body.get("data", [])]),
    "ollama": ("/api/tags", lambda body: [m.get("model") or m["name"] for m in body.get("models", [])]),
}


def remote_names(remote: RemoteConfig) -> list[str]:
    path, read = LISTS[remote.kind]
    response = httpx.get(remote.base_url + path, headers=remote.headers(), timeout=remote.list_timeout_s,
                         trust_env=False)
    response.raise_for_status()
    return read(response.json())


def remote_infos(remote: RemoteConfig) -> list[ModelInfo]:
    """The remote's models now; [] (logged) when it does not answer."""
    try:
        names = remote_names(remote)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        log.warning("remote %s (%s) is not listed: %s", remote.name, remote.base_url, exc)
        return []
    return [ModelInfo(name=remote.model_prefix + name, path="", family="remote", source="remote", context_length=0,
                      metadata={"remote": remote.name, "remote_model": name, "remote_url": remote.base_url})
            for name in names]


class RemoteCatalog:
    """Each remote's last model list (see the module's docstring)."""

    def __init__(self, remotes: tuple[RemoteConfig, ...]) -> None:
        self.remotes = remotes
        self._lists: dict[str, tuple[float, list[ModelInfo]]] = {}
        self._fetching: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        for remote in remotes:  # listed from the start, so the first /api/tags has them
            self._start_fetch(remote)

    def infos(self) -> list[ModelInfo]:
        return [info for remote in self.remotes for info in self._for(remote)]

    def _for(self, remote: RemoteConfig) -> list[ModelInfo]:
        with self._lock:
            cached = self._lists.get(remote.name)
            first = self._fetching.get(remote.name) if cached is None else None
        if first is not None:  # only the very first listing is waited for, and only so long
            first.wait(remote.list_timeout_s + 1)
            with self._lock:
                cached = self._lists.get(remote.name)
        if cached is None or time.monotonic() - cached[0] >= remote.list_every_s:
            self._start_fetch(remote)
        return cached[1] if cached else []

    def _start_fetch(self, remote: RemoteConfig) -> None:
        with self._lock:
            if remote.name in self._fetching:
                return
            self._fetching[remote.name] = done = threading.Event()
        threading.Thread(target=self._fetch, args=(remote, done), name=f"list-{remote.name}", daemon=True).start()

    def _fetch(self, remote: RemoteConfig, done: threading.Event) -> None:
        try:
            infos = remote_infos(remote)
            with self._lock:
                self._lists[remote.name] = (time.monotonic(), infos)
        finally:
            with self._lock:
                self._fetching.pop(remote.name, None)
            done.set()
