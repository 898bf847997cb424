"""POST /v1/rerank."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from serve_app.http.deps import ServicesDep, WorkMeterDep, require_infer
from serve_app.http.routes import AUTH_ERRORS, CACHE_HITS_HEADER, MODEL_VERSION_HEADER, metered
from serve_app.http.schemas import (
    ErrorResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
)

router = APIRouter(tags=["rerank"], dependencies=[Depends(require_infer)], responses=AUTH_ERRORS)


@router.post(
    "/v1/rerank",
    response_model=RerankResponse,
    responses={404: {"model": ErrorResponse}, 400: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def rerank(body: RerankRequest, request: Request, services: ServicesDep, meter: WorkMeterDep) -> Response:
    """Documents ranked by relevance to the query, best first, by a cross-encoder (a `rerank` model).

    The shape Cohere, Jina and text-embeddings-inference share. Each (query, document) pair's score
    is cached; only pairs not seen before are charged to the key's work budget and computed.
    """
    documents = body.texts
    history = {"model": body.model, "items": len(documents)}
    request.state.history = history
    async with metered(request, meter, history) as limit_headers:
        outcome = await services.rerank.rerank(body.model, body.query, documents, meter=meter)
    history.update(model=outcome.model, version=outcome.version, cache_hits=outcome.cache_hits)
    order = sorted(range(len(documents)), key=lambda i: float(outcome.scores[i]), reverse=True)
    if body.top_n is not None:
        order = order[: body.top_n]
    tokens = sum(outcome.token_counts)
    payload = RerankResponse(
        id=request.state.request_id,
        results=[
            RerankResult(
                index=i,
                relevance_score=float(outcome.scores[i]),
                document=RerankDocument(text=documents[i]) if body.return_documents else None,
            )
            for i in order
        ],
        model=outcome.model,
        usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
    return Response(
        content=payload.model_dump_json(exclude_none=True),
        media_type="application/json",
        headers={CACHE_HITS_HEADER: str(outcome.cache_hits), MODEL_VERSION_HEADER: outcome.version, **limit_headers},
    )
