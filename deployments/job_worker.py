"""The job-worker deployment: consumes RabbitMQ and runs jobs through Serve, so it autoscales like any other.

Each replica runs a consumer thread (bounded prefetch, manual ack). A delivered job is run by
calling `run_job` through this deployment's own handle: Serve balances jobs over the replicas
and counts them as ongoing requests, which is what its autoscaler scales on. Each replica also
delivers ended jobs' callbacks and publishes jobs a gateway accepted but never published. The
work itself is serve_app/jobs/worker.py.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import events
from serve_app import metrics as product_metrics
from serve_app.jobs.runner import Settlement
from serve_app.jobs.worker import JobWorkerRuntime
from serve_app.settings import get_settings


@serve.deployment(
    max_ongoing_requests=4,
    ray_actor_options={"num_cpus": 0.1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1},
)
class JobWorker:
    async def __init__(self, models: dict[str, DeploymentHandle], pool: DeploymentHandle | None = None) -> None:
        settings = get_settings()
        events.install(settings, "JobWorker")
        product_metrics.start()
        self.runtime = JobWorkerRuntime(settings, models, pool)
        context = serve.get_replica_context()
        own = serve.get_deployment_handle(context.deployment, context.app_name).options(method_name="run_job")
        await self.runtime.start(lambda job_id: own.remote(job_id))

    async def run_job(self, job_id: str) -> Settlement:
        """Run one delivered job; says what to do with its message."""
        return await self.runtime.run(job_id)

    def consuming(self) -> bool:
        """Whether this replica is connected to RabbitMQ and consuming; raises when it is not."""
        return self.runtime.consuming()

    def check_health(self) -> None:
        self.runtime.check_health()

    async def __del__(self) -> None:
        await self.runtime.stop()
