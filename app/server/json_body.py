"""Reads every request body as JSON, whatever Content-Type the client sent.

Ollama and llama.cpp parse the body as JSON regardless of the header, and
their users' first curl (`curl -d '{...}'`) sends
application/x-www-form-urlencoded. FastAPI would reject that as "not an
object", so this ASGI shim rewrites the header on requests that carry a body.
"""
from __future__ import annotations

JSON = b"application/json"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class JsonBodyMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            original = next((v for k, v in scope["headers"] if k.lower() == b"content-type"), b"")
            if b"json" not in original.lower():
                scope = {**scope, "headers": headers + [(b"content-type", JSON)]}
        await self.app(scope, receive, send)
