"""The application builder that `serve run serve_app.app:build_app` and `serve deploy` import."""

from __future__ import annotations

from pydantic import BaseModel, Field
from ray.serve import Application

from deployments.embedding_model import EmbeddingModel
from serve_app.gateway import Gateway
from serve_app.settings import get_settings


class AppArgs(BaseModel):
    """Arguments from the Serve config's `args:` or `serve run ... key=value`."""

    model: str = Field(default_factory=lambda: get_settings().default_model)


def build_app(args: dict[str, str] | None = None) -> Application:
    """Gateway -> EmbeddingModel: the whole synchronous inference path."""
    parsed = AppArgs.model_validate(args or {})
    return Gateway.bind({parsed.model: EmbeddingModel.bind(parsed.model)})
