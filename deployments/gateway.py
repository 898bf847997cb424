"""The ingress deployment: the FastAPI gateway (serve_app/http), one per Serve application.

`@serve.ingress()` with `__serve_build_asgi_app__` lets the app be built inside the replica, after
its clients exist, so this module needs no FastAPI import of its own.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import events
from serve_app import metrics as product_metrics
from serve_app.http.api import create_app
from serve_app.http.container import Services
from serve_app.settings import get_settings

logger = logging.getLogger("ray.serve")


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
        settings = get_settings()
        events.install(settings, "gateway")
        product_metrics.start()
        self.services = Services.from_settings(settings, models, job_worker, pool)
        logger.info("gateway replica started (models: %s)", ", ".join(sorted(models)), extra=events.EVENT)

    def __serve_build_asgi_app__(self):  # the FastAPI app; Serve calls this once per replica
        return create_app(self.services)
