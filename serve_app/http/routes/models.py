"""GET /v1/models and /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from serve_app.embeddings.contract import ModelInfo
from serve_app.http.deps import EmbeddingServiceDep, require_infer
from serve_app.http.routes import AUTH_ERRORS
from serve_app.http.schemas import ErrorResponse, ModelCard, ModelList

router = APIRouter(tags=["models"], dependencies=[Depends(require_infer)], responses=AUTH_ERRORS)


def _card(info: ModelInfo) -> ModelCard:
    return ModelCard(
        id=info.name,
        created=int(info.created),
        version=info.version,
        dims=info.dims,
        task=info.task,
        framework=info.framework,
        source=info.source,
        manifest_digest=info.manifest_digest,
        device=info.device,
        max_seq_length=info.max_seq_length,
    )


@router.get("/v1/models", response_model=ModelList, responses={503: {"model": ErrorResponse}})
async def list_models(service: EmbeddingServiceDep) -> ModelList:
    """The served models, each with its version and the object-store location of its weights."""
    return ModelList(data=[_card(await client.info()) for client in service.models.values()])


@router.get("/v1/models/{model}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model: str, service: EmbeddingServiceDep) -> ModelCard:
    """One served model."""
    return _card(await service.model(model).info())
