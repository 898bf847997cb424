"""The FastAPI application of the gateway, built around a Services container."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serve_app import tracing
from serve_app.http.container import Services
from serve_app.http.errors import install_error_handlers
from serve_app.http.middleware import RequestContextMiddleware
from serve_app.http.routes import admin, auth, embeddings, health, history, jobs, models, rerank, v2

API_VERSION = "0.1.0"


def create_app(services: Services) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.start()
        yield
        await services.stop()

    traced = tracing.configure(services.settings, "gateway")  # once per process; off without INFER_OTEL_ENDPOINT
    app = FastAPI(
        title="Inference cluster API",
        version=API_VERSION,
        description="Sentence embeddings served by Ray Serve, OpenAI-compatible.",
        lifespan=lifespan,
        telemetry=tracing.fastapi_telemetry(),  # a server span per request when tracing is on
    )
    app.state.services = services
    install_error_handlers(app)
    if traced:
        app.add_middleware(tracing.RequestAttributes)  # added first: inside RequestContextMiddleware
    app.add_middleware(RequestContextMiddleware, history=services.history, access_log=services.settings.access_log)
    for router in (
        embeddings.router,
        rerank.router,
        jobs.router,
        models.router,
        auth.router,
        history.router,
        admin.router,
        health.router,
        v2.router,
    ):
        app.include_router(router)
    return app
