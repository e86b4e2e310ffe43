"""Safe by default: Host, Origin, body size and (off loopback) token checks, as one ASGI middleware.

Why each check:
* Host: a web page can make the browser resolve its own name to 127.0.0.1 (DNS
  rebinding) and then talk to us as a "same origin" page; Ollama's
  CVE-2024-28224 was this. A request whose Host is not a loopback name is
  refused unless the user explicitly allowed a non-loopback bind.
* Origin: browsers send it on cross-origin fetches. Only the dashboard's own
  origin (loopback, our port) and origins the user configured may call us;
  programs (editors, CLIs) send no Origin and pass.
* Body size: a bounded body keeps a client from filling memory.
* Token: bound off loopback, everything but /health needs the bearer token.

It is plain ASGI (not BaseHTTPMiddleware) so streaming responses pass through
untouched and the per-token cost stays near zero.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from app import env
from app.server import auth
from app.server.errors import dialect_of, error_body

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
OPEN_PATHS = frozenset({"/health"})


def is_loopback_host(host: str) -> bool:
    """True for localhost names and loopback IPs (127.0.0.0/8, ::1), with or without a port."""
    name = _strip_port(host).lower().rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _strip_port(host: str) -> str:
    host = host.strip()
    if host.startswith("["):  # [::1]:8080
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


# Origins of editor webviews and desktop shells, which Ollama allows by default too: pages
# there are the user's own tools (VS Code extensions, Tauri and Electron apps), not web sites.
DEFAULT_ORIGINS = ("app://*", "file://*", "tauri://*", "vscode-webview://*")
ORIGINS_SETTING = "allowed_origins"


def origin_matches(origin: str, patterns: tuple[str, ...]) -> bool:
    """An exact origin, or a pattern with * (\"app://*\", \"http://localhost:*\")."""
    return any(fnmatch.fnmatchcase(origin, pattern) for pattern in patterns)


def origins_regex(patterns: tuple[str, ...]) -> str:
    """One regular expression for CORS that matches what origin_matches accepts."""
    return "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)


@dataclass(frozen=True)
class SecurityPolicy:
    port: int
    token: str
    allow_non_loopback: bool = False       # the user bound the daemon off loopback on purpose
    allowed_origins: tuple[str, ...] = ()  # extra browser origins, e.g. "http://localhost:5173"
    max_body_bytes: int = 8 << 20
    default_origins: tuple[str, ...] = DEFAULT_ORIGINS

    @property
    def origin_patterns(self) -> tuple[str, ...]:
        return self.default_origins + self.allowed_origins

    def host_allowed(self, host: str | None) -> bool:
        if self.allow_non_loopback:
            return True
        return bool(host) and is_loopback_host(host)

    def origin_allowed(self, origin: str | None) -> bool:
        if origin is None:
            return True  # not a browser's cross-origin request
        if origin_matches(origin, self.origin_patterns):   # as sent: "file://" stays itself
            return True
        origin = origin.rstrip("/")
        if origin_matches(origin, self.origin_patterns):
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # "null", extension schemes: not configured, refused
        # The dashboard's own origin: a loopback name on our own port.
        return is_loopback_host(parts.hostname) and parts.port == self.port


class SecurityMiddleware:
    """Refuses requests that fail the policy before any route runs."""

    def __init__(self, app, policy: SecurityPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, message = refusal
            log.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), message)
            await _send_json(send, status, message, scope["path"])
            return
        limit = _BodyLimit(receive, send, self.policy.max_body_bytes, scope["path"])
        await self.app(scope, limit.receive, limit.send)

    def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        if not self.policy.host_allowed(headers.get("host")):
            return 403, "Host header must name a loopback host (127.0.0.1 or localhost)"
        if not self.policy.origin_allowed(headers.get("origin")):
            origin = headers.get("origin")
            return 403, (f"browser origin {origin!r} is not allowed. To allow it, add it to {ORIGINS_SETTING} "
                         f"in settings.toml (allowed_origins = [{json.dumps(origin)}]) or to the "
                         f"{env.ORIGINS} environment variable, then restart Ebbtide")
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "Content-Length must be a number"
            if int(length) > self.policy.max_body_bytes:
                return 413, f"request body over the {self.policy.max_body_bytes} byte limit"
        # A CORS preflight never carries credentials; it reveals nothing and passes to CORS.
        is_preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if self.policy.allow_non_loopback and scope["path"] not in OPEN_PATHS and not is_preflight:
            if not auth.token_matches(self.policy.token, _token_of(headers)):
                return 401, "this daemon is reachable off loopback: a bearer token is required"
        return None


def _token_of(headers: dict[str, str]) -> str | None:
    cookies = SimpleCookie()
    try:
        cookies.load(headers.get("cookie", ""))
    except Exception:  # a malformed cookie header is no token, not an error
        cookies = SimpleCookie()
    return auth.presented_token(headers, {k: m.value for k, m in cookies.items()})


class _BodyLimit:
    """Counts body bytes as they arrive, for bodies sent without Content-Length. Past the
    limit it answers 413 itself and tells the app the client left (FastAPI would turn an
    exception raised while reading into a generic 400); what the app sends after is dropped."""

    def __init__(self, receive, send, limit: int, path: str) -> None:
        self._receive, self._send = receive, send
        self.limit, self.path = limit, path
        self.seen = 0
        self.refused = False
        self.started = False

    async def receive(self):
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                self.refused = True
                if not self.started:
                    await _send_json(self._send, 413, f"request body over the {self.limit} byte limit", self.path)
                return {"type": "http.disconnect"}
        return message

    async def send(self, message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


_KINDS = {401: "authentication_error", 403: "permission_error", 413: "invalid_request_error",
          400: "invalid_request_error"}


async def _send_json(send, status: int, message: str, path: str) -> None:
    body = json.dumps(error_body(dialect_of(path), status, _KINDS[status], message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
