"""Liveness and readiness for load balancers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serve_app.http.deps import ServicesDep
from serve_app.http.schemas import Liveness, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Liveness)
async def healthz() -> Liveness:
    """The gateway process is alive."""
    return Liveness()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(services: ServicesDep) -> JSONResponse:
    """Each dependency's status: 200 when ready or degraded (still serving), 503 when no model answers."""
    report = await services.readiness()
    return JSONResponse(report.model_dump(), status_code=503 if report.status == "unavailable" else 200)
