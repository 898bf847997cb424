"""The application builder that `serve run serve_app.app:build_app` and `serve deploy` import."""

from __future__ import annotations

from pydantic import BaseModel, Field
from ray.serve import Application

from deployments.embedding_model import EmbeddingModel
from deployments.gateway import Gateway
from deployments.job_worker import JobWorker
from deployments.model_pool import ModelPool
from serve_app.embeddings.contract import pinned_deployment
from serve_app.settings import get_settings


class AppArgs(BaseModel):
    """Arguments from the Serve config's `args:` or `serve run ... key=value`."""

    model: str = Field(default_factory=lambda: get_settings().default_model)
    pinned: list[str] = Field(
        default_factory=list,
        description="More models pinned, of any task: each its own deployment, named Pinned-<model>.",
    )
    pool_models_per_replica: int = Field(
        2, ge=1, description="Models each on-demand pool replica keeps loaded (the least recently used goes)."
    )


def build_app(args: dict[str, object] | None = None) -> Application:
    """Gateway -> EmbeddingModel (the pinned model) or ModelPool (any other model in the repository, on
    demand) for requests; JobWorker -> the same for asynchronous jobs."""
    parsed = AppArgs.model_validate(args or {})
    models = {parsed.model: EmbeddingModel.bind(parsed.model)}
    for name in parsed.pinned:
        if name != parsed.model:
            models[name] = EmbeddingModel.options(name=pinned_deployment(name)).bind(name)
    pool = ModelPool.bind(parsed.pool_models_per_replica)
    # Serve deploys what the ingress's bound arguments reach, and nothing else: passing the bound
    # JobWorker to the Gateway is what deploys the job workers. The gateway itself only asks it
    # whether it consumes (readiness); jobs reach the workers through RabbitMQ, never this handle.
    return Gateway.bind(models, JobWorker.bind(models, pool), pool)
