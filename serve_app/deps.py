"""Route dependencies as Annotated types, so a route's signature shows what it needs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve_app.embedding_service import EmbeddingService
from serve_app.services import Services


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_embedding_service(request: Request) -> EmbeddingService:
    return request.app.state.services.embeddings


def get_caller() -> str:
    """Who is calling. Until API keys arrive (issue 5), every caller is the one tenant "anonymous"."""
    return "anonymous"


ServicesDep = Annotated[Services, Depends(get_services)]
CallerDep = Annotated[str, Depends(get_caller)]
EmbeddingServiceDep = Annotated[EmbeddingService, Depends(get_embedding_service)]
