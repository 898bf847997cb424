"""Route dependencies as Annotated types, so a route's signature shows what it needs.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in a worker thread,
a thread hop per request that the profile showed (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve_app.embedding_service import EmbeddingService
from serve_app.services import Services


async def get_services(request: Request) -> Services:
    return request.app.state.services


async def get_embedding_service(request: Request) -> EmbeddingService:
    return request.app.state.services.embeddings


async def get_caller() -> str:
    """Who is calling. Until API keys arrive (issue 5), every caller is the one tenant "anonymous"."""
    return "anonymous"


ServicesDep = Annotated[Services, Depends(get_services)]
CallerDep = Annotated[str, Depends(get_caller)]
EmbeddingServiceDep = Annotated[EmbeddingService, Depends(get_embedding_service)]
