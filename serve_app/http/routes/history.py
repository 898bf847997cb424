"""GET /v1/history: the caller's own request records."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from serve_app.http.deps import CallerDep, ServicesDep
from serve_app.http.routes import AUTH_ERRORS
from serve_app.http.schemas import HistoryList, HistoryRecord

router = APIRouter(tags=["history"], responses=AUTH_ERRORS)

_FIELDS = set(HistoryRecord.model_fields) - {"ts"}


@router.get("/v1/history", response_model=HistoryList)
async def list_history(
    services: ServicesDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> HistoryList:
    """The caller's (its user's) POST requests, newest first; they are written within a second or so."""
    page, next_cursor = await services.history.page(caller.owner, limit=limit, before=cursor)
    return HistoryList(
        data=[HistoryRecord(ts=d["ts"].isoformat(), **{k: v for k, v in d.items() if k in _FIELDS}) for d in page],
        next_cursor=next_cursor,
    )
