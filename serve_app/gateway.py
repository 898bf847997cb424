"""The ingress deployment: the FastAPI gateway, one per Serve application."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api import create_app
from serve_app.services import Services
from serve_app.settings import get_settings


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Gateway:
    """Validates, answers from the cache, sends misses to the model deployments, records history."""

    def __init__(self, models: dict[str, DeploymentHandle], job_worker: DeploymentHandle | None = None) -> None:
        self.services = Services.from_settings(get_settings(), models, job_worker)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.services)
