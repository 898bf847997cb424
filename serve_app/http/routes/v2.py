"""The Open Inference Protocol (KServe v2 / Triton HTTP) over the same models, keys and cache as /v1.

Embedding models take one BYTES input of texts ("text") and give "embedding", FP32 [n, dims];
rerank models take "query" (BYTES [1]) and "documents" (BYTES [n]) and give "scores", FP32 [n], in
the documents' order. Errors are the protocol's {"error": "..."} (serve_app/http/errors.py).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse

from serve_app.errors import InvalidRequestError
from serve_app.http.deps import ServicesDep, WorkMeterDep, require_infer
from serve_app.http.routes import CACHE_HITS_HEADER, MODEL_VERSION_HEADER, metered
from serve_app.http.schemas import (
    V2Error,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)
from serve_app.model_repository import NAME_PATTERN
from serve_app.v2.protocol import HEADER_LENGTH, ProtocolError, encode_response, metadata, parse_request

# Every error in the protocol's shape; 422 too (a path parameter that is not a model name, say).
V2_ERRORS: dict[int | str, dict] = {
    status: {"model": V2Error, "description": description}
    for status, description in {
        400: "A request the protocol or the model cannot take.",
        401: "No credential, or a malformed, unknown, revoked or expired one.",
        403: "The key lacks the `infer` scope.",
        404: "No such model or version.",
        422: "A path parameter that is not a model name or version.",
        429: "Over the key's rate limit or work budget; see Retry-After.",
        503: "A dependency (model, key store, repository) is unavailable.",
    }.items()
}

router = APIRouter(
    prefix="/v2",
    tags=["open inference protocol (v2)"],
    dependencies=[Depends(require_infer)],
    responses=V2_ERRORS,
)

ModelName = Annotated[str, Path(pattern=NAME_PATTERN.pattern)]
SERVER_NAME = "inference-cluster"


def _spec(name: str, version: str | None) -> str:
    return f"{name}:{version}" if version else name


@router.get("/health/live", response_model=V2Live)
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", response_model=V2Ready, responses={503: {"model": V2Ready}})
async def ready(services: ServicesDep) -> JSONResponse:
    """Ready while every pinned model answers (the gateway's own readiness, /readyz)."""
    report = await services.readiness()
    return JSONResponse({"ready": report.status != "unavailable"}, 503 if report.status == "unavailable" else 200)


@router.get("", response_model=V2ServerMetadata)
async def server_metadata() -> dict:
    from serve_app.http.api import API_VERSION

    return {"name": SERVER_NAME, "version": API_VERSION, "extensions": ["binary_tensor_data"]}


@router.get("/models/{name}", response_model=V2ModelMetadata)
@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata)
async def model_metadata(name: ModelName, services: ServicesDep, version: ModelName | None = None) -> dict:
    described = await services.embeddings.catalog.describe(_spec(name, version))
    versions = [version] if version else described.versions
    return metadata(described.name, versions, described.task, described.dims, described.framework)


@router.get("/models/{name}/ready", response_model=V2ModelReady)
@router.get("/models/{name}/versions/{version}/ready", response_model=V2ModelReady)
async def model_ready(name: ModelName, services: ServicesDep, version: ModelName | None = None) -> dict:
    """Ready: a pinned model whose replicas answer, or a version the on-demand pool can load."""
    described = await services.embeddings.catalog.describe(_spec(name, version))
    return {"name": described.name, "ready": True}


INFER_RESPONSES: dict[int | str, dict] = {
    200: {
        "model": V2InferResponse,
        "description": "The outputs; with binary outputs asked for, the JSON header then the raw tensors.",
        "content": {"application/octet-stream": {}},
    }
}
INFER_BODY = {
    "requestBody": {
        "description": "An inference request: JSON, or a JSON header (Inference-Header-Content-Length) then "
        "binary tensors.",
        "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
    }
}


@router.post("/models/{name}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
@router.post("/models/{name}/versions/{version}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
async def infer(
    name: ModelName, request: Request, services: ServicesDep, meter: WorkMeterDep, version: ModelName | None = None
) -> Response:
    spec = _spec(name, version)
    try:
        parsed, inputs = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
    except ProtocolError as exc:
        raise InvalidRequestError(str(exc)) from None
    limit = services.settings.max_items_per_request
    history = {"model": name, "items": 0}
    request.state.history = history
    described = await services.embeddings.catalog.describe(spec)
    async with metered(request, meter, history) as limit_headers:
        if described.task == "rerank":
            query, documents = _rerank_inputs(inputs, limit, services.settings.max_text_chars)
            history["items"] = len(documents)
            outcome = await services.rerank.rerank(spec, query, documents, meter=meter)
            outputs = {"scores": outcome.scores}
        else:
            texts = _embed_inputs(inputs, limit, services.settings.max_text_chars)
            history["items"] = len(texts)
            outcome = await services.embeddings.embed(spec, texts, meter=meter)
            outputs = {"embedding": np.asarray(outcome.vectors)}
    history.update(model=outcome.model, version=outcome.version, cache_hits=outcome.cache_hits)
    try:
        body, headers = encode_response(parsed, outcome.model, outcome.version, outputs)
    except ProtocolError as exc:
        raise InvalidRequestError(str(exc)) from None
    headers |= {MODEL_VERSION_HEADER: outcome.version, CACHE_HITS_HEADER: str(outcome.cache_hits), **limit_headers}
    media = "application/octet-stream" if HEADER_LENGTH in headers else "application/json"
    return Response(content=body, media_type=media, headers=headers)


def _checked(texts: list[str], what: str, limit: int, max_chars: int) -> list[str]:
    from serve_app.embeddings.texts import text_problem

    if not texts:
        raise InvalidRequestError(f"input {what!r} holds no texts")
    if len(texts) > limit:
        raise InvalidRequestError(f"input {what!r} has {len(texts)} texts; at most {limit} are allowed")
    for i, text in enumerate(texts):
        if problem := text_problem(text, max_chars):
            raise InvalidRequestError(f"input {what!r}[{i}] {problem}")
    return texts


def _embed_inputs(inputs: dict[str, list[str]], limit: int, max_chars: int) -> list[str]:
    if len(inputs) != 1:
        raise InvalidRequestError(f'an embedding model takes one input ("text"); this request has {len(inputs)}')
    ((name, texts),) = inputs.items()
    return _checked(texts, name, limit, max_chars)


def _rerank_inputs(inputs: dict[str, list[str]], limit: int, max_chars: int) -> tuple[str, list[str]]:
    missing = [n for n in ("query", "documents") if n not in inputs]
    if missing or len(inputs) != 2:
        raise InvalidRequestError(
            f'a rerank model takes the inputs "query" and "documents"; this request has {sorted(inputs)}'
        )
    query = _checked(inputs["query"], "query", 1, max_chars)
    return query[0], _checked(inputs["documents"], "documents", limit, max_chars)
