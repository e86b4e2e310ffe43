"""The remote servers' models as registry entries: prefix + the remote's own name, source "remote".

Listed with a short timeout; a remote that does not answer is logged and left out,
never an error for the local models listed beside it.
"""
from __future__ import annotations

import logging

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


def scan_remotes(remotes: tuple[RemoteConfig, ...]) -> list[ModelInfo]:
    infos: list[ModelInfo] = []
    for remote in remotes:
        try:
            names = remote_names(remote)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.warning("remote %s (%s) is not listed: %s", remote.name, remote.base_url, exc)
            continue
        infos.extend(ModelInfo(name=remote.model_prefix + name, path="", family="remote", source="remote",
                               context_length=0, metadata={"remote": remote.name, "remote_model": name,
                                                           "remote_url": remote.base_url})
                     for name in names)
    return infos
