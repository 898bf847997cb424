"""The ingress deployment: the FastAPI gateway (serve_app/http), one per Serve application.

`@serve.ingress()` with `__serve_build_asgi_app__` lets the app be built inside the replica, after
its clients exist, so this module needs no FastAPI import of its own.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.http.api import create_app
from serve_app.http.container import Services
from serve_app.settings import get_settings


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Gateway:
    """Validates, answers from the cache, sends misses to the model deployments, records history."""

    def __init__(
        self,
        models: dict[str, DeploymentHandle],
        job_worker: DeploymentHandle | None = None,
        pool: DeploymentHandle | None = None,
    ) -> None:
        self.services = Services.from_settings(get_settings(), models, job_worker, pool)

    def __serve_build_asgi_app__(self):  # the FastAPI app; Serve calls this once per replica
        return create_app(self.services)
