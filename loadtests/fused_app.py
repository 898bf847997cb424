"""A benchmark experiment: the gateway and the model in one deployment, so no handle hop.

The production application keeps them apart (Gateway -> EmbeddingModel), so that model replicas
scale, batch and load weights on their own and several models can sit behind one gateway. This
variant answers "what does the hop cost?": each replica runs the same FastAPI app, with the
model called in-process through an object that looks like a DeploymentHandle.

    python -m loadtests.bench --setups serve,fused     # deploys it beside the main app, then removes it
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI
from ray import serve

from deployments.embedding_model import EmbeddingModel, ModelConfig
from serve_app.http.api import create_app
from serve_app.http.container import Services
from serve_app.settings import get_settings

ROUTE_PREFIX = "/fused"


class _LocalMethod:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            result = self.fn(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return call()


class LocalHandle:
    """The DeploymentHandle interface (`handle.method.remote(...)`) over an object in this process."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, method: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.target, method))


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class FusedGateway:
    def __init__(self, model_name: str) -> None:
        self.model = EmbeddingModel.func_or_class(model_name)
        self.services = Services.from_settings(get_settings(), {model_name: LocalHandle(self.model)})

    async def reconfigure(self, user_config: dict) -> None:
        await self.model.reconfigure(user_config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.services)


def application_config(model: str, replicas: int = 2) -> dict:
    """The Serve config entry of this experiment (one-thread replicas, like the model deployment's)."""
    return {
        "name": "fused",
        "route_prefix": ROUTE_PREFIX,
        "import_path": "loadtests.fused_app:build_fused",
        "args": {"model": model},
        "deployments": [
            {
                "name": "FusedGateway",
                "num_replicas": replicas,
                # Beside the main application, whose deployments hold every CPU in Ray's ledger of a 2-core
                # node, replicas asking for CPUs never start; they share the real cores either way.
                "ray_actor_options": {"num_cpus": 0},
                "user_config": ModelConfig(torch_threads=1).model_dump(),
            }
        ],
    }


def build_fused(args: dict[str, str] | None = None) -> serve.Application:
    model = (args or {}).get("model") or get_settings().default_model
    return FusedGateway.bind(model)
