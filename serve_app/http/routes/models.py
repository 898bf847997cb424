"""GET /v1/models and /v1/models/{model}: the pinned models and every other model in the repository."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends

from serve_app.embeddings.catalog import parse_model, pool_loaded, version_state
from serve_app.embeddings.contract import ModelInfo
from serve_app.errors import ModelNotFoundError, ServiceUnavailableError
from serve_app.http.deps import ServicesDep, require_infer
from serve_app.http.routes import AUTH_ERRORS
from serve_app.http.schemas import ErrorResponse, ModelCard, ModelList, ModelVersionState
from serve_app.model_repository import Manifest

logger = logging.getLogger(__name__)

PINNED_WAIT_S = 3.0  # how long a listing waits for a pinned deployment to say what it serves

router = APIRouter(tags=["models"], dependencies=[Depends(require_infer)], responses=AUTH_ERRORS)


def _versions(
    name: str, manifests: list[Manifest], served: dict[str, str], loaded: set[str]
) -> list[ModelVersionState]:
    return [
        ModelVersionState(
            version=m.version,
            state=version_state(name, m.version, served, loaded),
            pushed_at=int(m.created.timestamp()),
        )
        for m in manifests
    ]


def _card_of_info(info: ModelInfo, state: str, versions: list[ModelVersionState]) -> ModelCard:
    return ModelCard(
        id=info.name,
        created=int(info.created),
        version=info.version,
        state=state,
        dims=info.dims,
        task=info.task,
        framework=info.framework,
        source=info.source,
        manifest_digest=info.manifest_digest,
        device=info.device,
        backend=info.backend,
        max_seq_length=info.max_seq_length,
        versions=versions,
        canary_version=info.canary_version,
        canary_percent=info.canary_percent if info.canary_version else None,
    )


def _card_of_manifest(manifest: Manifest, source: str, state: str, versions: list[ModelVersionState]) -> ModelCard:
    return ModelCard(
        id=manifest.name,
        created=int(manifest.created.timestamp()),
        version=manifest.version,
        state=state,
        dims=manifest.dims,
        task=manifest.task,
        framework=manifest.framework,
        source=source,
        manifest_digest=manifest.digest,
        max_seq_length=manifest.max_tokens,
        versions=versions,
    )


async def _cards(services, only: str | None = None) -> list[ModelCard]:
    catalog = services.embeddings.catalog
    names = [name for name in catalog.pinned if only in (None, name)]
    answers = await catalog.pinned_answers(names, wait_s=PINNED_WAIT_S)
    infos = {name: answer for name, answer in answers.items() if isinstance(answer, ModelInfo)}
    served = {name: info.version for name, info in infos.items()}
    try:
        listing = await catalog.listing() if only is None else {only: await catalog.versions(only)}
    except ServiceUnavailableError as exc:  # the pinned models still answer: list them
        if only is not None and only not in catalog.pinned:
            raise  # one unpinned model: that the repository is down is the answer, not a 404
        logger.warning("GET /v1/models without the repository: %s", exc.message)
        listing = {}
    loaded = await pool_loaded(services.clients.redis) if listing else set()
    cards = []
    for name, answer in answers.items():
        versions = _versions(name, listing.get(name, []), served, loaded)
        if isinstance(answer, ModelInfo):
            cards.append(_card_of_info(answer, "pinned", versions))
            continue
        # Its deployment does not answer (starting, or down): say so, from what it last said or the
        # repository, rather than failing the whole listing.
        last = catalog.pinned[name].last_info
        if last is not None:
            cards.append(_card_of_info(last, "unavailable", versions))
        elif listing.get(name):
            newest = listing[name][-1]
            source = catalog.repository.uri(name, newest.version) if catalog.repository else ""
            cards.append(_card_of_manifest(newest, source, "unavailable", versions))
        elif only is not None:
            raise answer
        else:
            logger.warning("GET /v1/models leaves out %s: %s, and nothing else describes it", name, answer.message)
    for name, manifests in listing.items():
        if name in catalog.pinned or not manifests:
            continue
        newest = manifests[-1]
        source = catalog.repository.uri(name, newest.version) if catalog.repository else ""
        versions = _versions(name, manifests, served, loaded)
        cards.append(_card_of_manifest(newest, source, versions[-1].state, versions))
    return cards


@router.get("/v1/models", response_model=ModelList, responses={503: {"model": ErrorResponse}})
async def list_models(services: ServicesDep) -> ModelList:
    """Every model: the pinned ones (served by their own deployments) first, then every other model in
    the repository (served on demand), each with its versions and their states."""
    return ModelList(data=await _cards(services))


@router.get("/v1/models/{model}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model: str, services: ServicesDep) -> ModelCard:
    """One model, by name."""
    name, _ = parse_model(model)
    cards = await _cards(services, only=name)
    if not cards:
        raise ModelNotFoundError(f"the model {name!r} does not exist; GET /v1/models lists every model", param="model")
    return cards[0]
