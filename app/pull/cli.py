"""`ebbtide pull NAME`: through the running daemon's /api/pull (so the dashboard and tray show
it), or in this process when no daemon runs; a bar on the terminal either way."""
from __future__ import annotations

import json
import sys

import httpx

from app import exit_codes
from app.pull.errors import BadModelName, NothingToPull, PullError
from app.pull.progress import PullBar, PullProgress

EXIT_FOR = {BadModelName: exit_codes.USAGE, NothingToPull: exit_codes.NOT_FOUND}


def _via_daemon(base_url: str, name: str, bar: PullBar) -> None:
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(30, read=None), trust_env=False) as http:
        with http.stream("POST", "/api/pull", json={"model": name}) as response:
            if response.status_code != 200:
                response.read()
                raise _error_from(response.status_code, response.json().get("error", response.text))
            for line in response.iter_lines():
                data = json.loads(line) if line.strip() else {}
                if "error" in data:
                    raise PullError(data["error"])
                if data:
                    bar(PullProgress(**{k: data.get(k) for k in ("status", "digest", "total", "completed")}))


def _error_from(status: int, message: str) -> PullError:
    return {400: BadModelName, 404: NothingToPull}.get(status, PullError)(message)


def _in_process(name: str, cache_dir, bar: PullBar) -> None:
    from app.pull.hub import PullConfig, pull
    from app.pull.names import parse_pull_name

    pull(parse_pull_name(name), PullConfig(cache_dir), bar)


def run_pull(name: str, base_url: str | None, cache_dir) -> int:
    """base_url: the running daemon, or None to pull here into cache_dir."""
    bar = PullBar()
    try:
        if base_url:
            _via_daemon(base_url, name, bar)
        else:
            _in_process(name, cache_dir, bar)
    except PullError as exc:
        print(f"ebbtide: {exc}", file=sys.stderr)
        return EXIT_FOR.get(type(exc), exit_codes.ERROR)
    print(f"Pulled {name}.")
    return exit_codes.OK
