"""Before the daemon binds: is its port free, and if not, who holds it and what to do.

uvicorn alone ends a busy port with "[Errno 98] error while attempting to bind"
and nothing more. Here the port is tried first (as uvicorn binds it: with
SO_REUSEADDR, so a socket in TIME_WAIT does not count as busy); when it is in
use, the holder is asked what it is (an Ebbtide answers /api/version with its
own version, Ollama with a version only), on Linux the process is named from
/proc, and the message says how to choose another port.
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import httpx


def port_problem(host: str, port: int, url: str, settings_file: Path | None) -> str | None:
    """None when host:port can be bound, else a message for the user."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return f"could not listen on {host}:{port}: {exc.strerror or exc}"
        return busy_message(host, port, url, settings_file)
    return None


def busy_message(host: str, port: int, url: str, settings_file: Path | None) -> str:
    other = port + 1
    where = f", or `port = {other}` in {settings_file}" if settings_file else ""
    return (f"port {port} on {host} is already in use{holder(url, port)}.\n"
            f"  To use another port: `ebbtide serve --port {other}`, EBBTIDE_PORT={other}{where}.")


def holder(url: str, port: int) -> str:
    """What answers at url (", by ..."), as far as it can be told."""
    process = _listening_process(port)
    named = f" (pid {process[0]}, {process[1]})" if process else ""
    try:
        answer = httpx.get(f"{url}/api/version", timeout=1.0, trust_env=False)
        info = answer.json() if answer.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        info = {}
    if isinstance(info, dict) and info.get("ebbtide"):
        return (f" by Ebbtide {info['ebbtide']}{named}, which is already running: use it at {url} "
                f"(`ebbtide status` shows it), or stop it first")
    if isinstance(info, dict) and info.get("version"):
        return f" by a server speaking Ollama's API (Ollama?){named}"
    return f" by another program{named}" if named else ""


def _listening_process(port: int) -> tuple[int, str] | None:
    """(pid, name) of this user's process listening on port, from Linux's /proc; else None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return int(pid), Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue   # gone, or another user's
    return None
