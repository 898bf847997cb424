"""The application builder that `serve run serve_app.app:build_app` and `serve deploy` import."""

from __future__ import annotations

from pydantic import BaseModel, Field
from ray.serve import Application

from deployments.embedding_model import EmbeddingModel
from deployments.job_worker import JobWorker
from serve_app.gateway import Gateway
from serve_app.settings import get_settings


class AppArgs(BaseModel):
    """Arguments from the Serve config's `args:` or `serve run ... key=value`."""

    model: str = Field(default_factory=lambda: get_settings().default_model)


def build_app(args: dict[str, str] | None = None) -> Application:
    """Gateway -> EmbeddingModel for requests; JobWorker -> EmbeddingModel for asynchronous jobs."""
    parsed = AppArgs.model_validate(args or {})
    models = {parsed.model: EmbeddingModel.bind(parsed.model)}
    return Gateway.bind(models, JobWorker.bind(models))
