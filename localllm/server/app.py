"""The FastAPI application: routes, middleware, error handlers and the model registry's lifetime.

Middleware, outermost first: quiet ends for requests cut by a stop
(stopping.py), the Host and Origin checks (browser_guard.py),
CORS (only with --cors-origin), the request counter for /metrics, the API key
check (only with a key), the body size limit. `create_app` builds everything from ServerSettings and starts nothing;
uvicorn runs the app's lifespan, which preloads the start-up model and runs the
keep-alive reaper, and unloads every model on shutdown.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response

from localllm import __version__
from localllm.server import anthropic_routes, embedding_routes, ollama_admin_routes, ollama_routes, openai_routes, responses_routes
from localllm.server.auth import APIKeyMiddleware
from localllm.server.browser_guard import BrowserGuardMiddleware
from localllm.server.errors import install_error_handlers
from localllm.server.limits import BodyLimitMiddleware
from localllm.server.metrics import CONTENT_TYPE, Metrics, RequestCounter
from localllm.server.registry import ModelRegistry
from localllm.server.settings import ServerSettings, is_loopback
from localllm.server.state import ServerState
from localllm.server.stopping import StoppingMiddleware


def create_app(settings: ServerSettings, registry: ModelRegistry | None = None) -> FastAPI:
    registry = registry or ModelRegistry(settings)
    metrics = Metrics(registry.engine_stats)
    state = ServerState(settings, registry, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(registry.run_reaper())
        preload = asyncio.create_task(registry.preload())
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.wait({preload})
            await registry.close()

    app = FastAPI(
        title="localllm",
        version=__version__,
        description="OpenAI-, Ollama- and Anthropic-compatible API for local models.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's doc pages load scripts from a CDN: not for an offline, local server
        redoc_url=None,
    )
    app.state.localllm = state
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(ollama_routes.router)
    app.include_router(ollama_admin_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(embedding_routes.router)
    app.include_router(responses_routes.router)
    _add_system_routes(app, state)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestCounter, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
            allow_headers=["*"],  # SDKs add their own headers (x-stainless-*, ...)
        )
    app.add_middleware(  # outermost: a refused page costs no work at all
        BrowserGuardMiddleware,
        check_host=is_loopback(settings.host) or bool(settings.allowed_hosts),
        allowed_hosts=[*settings.allowed_hosts, settings.host],
        cors_origins=settings.cors_origins,
    )
    app.add_middleware(StoppingMiddleware, stopping=lambda: registry.stopping)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _add_system_routes(app: FastAPI, state: ServerState) -> None:
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root() -> PlainTextResponse:
        return PlainTextResponse("localllm is running")  # Ollama's clients probe this

    @app.get("/health")
    async def health() -> JSONResponse:
        registry = state.registry
        if registry.preload_state == "loading":
            return JSONResponse({"status": "loading"}, status_code=503)
        if registry.preload_state == "failed":
            return JSONResponse({"status": "failed", "error": registry.preload_error}, status_code=503)
        return JSONResponse({"status": "ok", "loaded": [m.name for m in registry.loaded()]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with our 400 in place of its 422 for invalid requests."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = {"description": "Invalid request: the body names the problem"}
    app.openapi_schema = schema
    return schema
