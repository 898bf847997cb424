"""POST /v1/embeddings."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Depends, Request, Response

from serve_app.http.deps import EmbeddingServiceDep, WorkMeterDep, require_infer
from serve_app.http.routes import AUTH_ERRORS, CACHE_HITS_HEADER, MODEL_VERSION_HEADER, metered
from serve_app.http.schemas import Embedding, EmbeddingRequest, EmbeddingResponse, ErrorResponse, Usage

router = APIRouter(tags=["embeddings"], dependencies=[Depends(require_infer)], responses=AUTH_ERRORS)


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses={
        404: {"model": ErrorResponse},
        400: {"model": ErrorResponse},
        429: {"model": ErrorResponse, "description": "Over the key's request rate, work budget or in-flight work."},
        503: {"model": ErrorResponse},
    },
)
async def create_embeddings(
    body: EmbeddingRequest,
    request: Request,
    service: EmbeddingServiceDep,
    meter: WorkMeterDep,
) -> Response:
    """Embeddings of one text or a list of texts, OpenAI-compatible; cached items are not recomputed.

    Cache misses are charged to the key's work budget (estimated tokens) before any model work:
    over it, a 429 with Retry-After and x-ratelimit-*-tokens.
    """
    texts = body.texts
    history = {"model": body.model, "items": len(texts)}
    request.state.history = history
    async with metered(request, meter, history) as limit_headers:
        outcome = await service.embed(body.model, texts, body.dimensions, meter=meter)
    history.update(model=outcome.model, version=outcome.version, cache_hits=outcome.cache_hits)
    if body.encoding_format == "base64":
        encoded = [base64.b64encode(v.astype("<f4", copy=False).tobytes()).decode() for v in outcome.vectors]
    else:
        encoded = outcome.vectors.tolist()
    tokens = sum(outcome.token_counts)
    payload = EmbeddingResponse(
        data=[Embedding(index=i, embedding=e) for i, e in enumerate(encoded)],
        model=outcome.model,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )
    return Response(
        content=payload.model_dump_json(),
        media_type="application/json",
        headers={CACHE_HITS_HEADER: str(outcome.cache_hits), MODEL_VERSION_HEADER: outcome.version, **limit_headers},
    )
