"""Builds the FastAPI app: the four dialects' routers, the dashboard, the safety and metrics
middleware and the one error mapping. The daemon passes in everything the app uses
(CONVENTIONS 10), so tests build the same app around the same real parts.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from app.resources import assets_dir
from app.server import (auth, control_routes, errors, llamacpp_routes, ollama_info_routes, ollama_routes, openai_chat,
                        openai_routes, pull_routes)
from app.server.context import VERSION, ServerContext, ctx_of
from app.server.json_body import JsonBodyMiddleware
from app.server.metrics import MetricsMiddleware
from app.server.security import SecurityMiddleware, SecurityPolicy, origins_regex

log = logging.getLogger(__name__)


def create_app(ctx: ServerContext) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.manager.start()
        try:
            yield
        finally:
            await ctx.manager.close()

    app = FastAPI(title="Ebbtide", version=VERSION, lifespan=lifespan,
                  description="Local LLMs over the OpenAI, Ollama and llama.cpp APIs, "
                              "with a control API that gives GPU memory back.")
    app.state.ctx = ctx
    errors.install(app)
    for module in (openai_chat, openai_routes, ollama_routes, ollama_info_routes, pull_routes, llamacpp_routes,
                   control_routes):
        app.include_router(module.router)
    _add_metrics_and_dashboard(app)
    policy = SecurityPolicy(port=ctx.settings.port, token=ctx.token,
                            allow_non_loopback=ctx.settings.allow_non_loopback,
                            allowed_origins=tuple(o.rstrip("/") for o in ctx.settings.allowed_origins),
                            max_body_bytes=ctx.settings.max_body_bytes)
    # Last added runs first: metrics count every request, refused ones too (403, 413, 400),
    # then the security check sees each before anything else. CORS answers only for the
    # allowed origins (the defaults and the user's; the dashboard is same-origin).
    app.add_middleware(CORSMiddleware, allow_origin_regex=origins_regex(policy.origin_patterns),
                       allow_methods=["*"], allow_headers=["*"], allow_credentials=False)
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(SecurityMiddleware, policy=policy)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)
    return app


def _add_metrics_and_dashboard(app: FastAPI) -> None:
    @app.get("/metrics", response_class=PlainTextResponse, tags=["metrics"])
    async def metrics(request: Request) -> PlainTextResponse:
        # Rendering reads every engine's memory: in the thread pool (control_routes says why).
        text = await run_in_threadpool(ctx_of(request).metrics.render)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard(request: Request, token: str | None = None) -> Response:
        ctx = ctx_of(request)
        if token is not None:
            # Trade the one-time URL token for a cookie and take it out of the address bar.
            if not auth.token_matches(ctx.token, token):
                raise errors.Unauthorized("wrong dashboard token: open the dashboard from the tray")
            response = RedirectResponse("/dashboard", status_code=303)
            response.set_cookie(auth.COOKIE_NAME, ctx.token, httponly=True, samesite="strict", path="/")
            return response
        index = assets_dir() / "dashboard" / "index.html"
        if not index.is_file():
            return PlainTextResponse("the dashboard is not installed (app/assets/dashboard/index.html)", 404)
        return FileResponse(index, headers={"Cache-Control": "no-store"})

    # StaticFiles resolves paths inside the folder only: no request reaches files outside it.
    folder = assets_dir()
    if folder.is_dir():
        app.mount("/assets", StaticFiles(directory=folder), name="assets")
