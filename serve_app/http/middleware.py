"""ASGI middleware: a request id on every request and response, a history record (with the caller) per POST,
and per request the product's request counter (ray_inference_requests_total) and one structured access-log line."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import metrics
from serve_app.history import HistoryWriter

logger = logging.getLogger("ray.serve")  # Serve's logger: the replica's log file, JSON-encoded per serve_config
REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RECORDED_PREFIXES = ("/v1/", "/v2/")
CLIENT_CLOSED = 499  # NGINX's status for a request whose client left before the answer: not a server error


class RequestContextMiddleware:
    """Passes through a well-formed X-Request-ID (NGINX sets one) or makes one, and echoes it."""

    def __init__(self, app: ASGIApp, history: HistoryWriter, access_log: bool = True) -> None:
        self.app = app
        self.history = history
        self.access_log = access_log
        self._answered_models: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:  # the client left before an answer (Serve cancels the request)
            if not answered:
                status = CLIENT_CLOSED
            raise
        finally:
            try:
                self._account(scope, state, request_id, status, started)
            except Exception:  # metrics, the access line or history must never replace the answer or the error
                logger.exception("accounting for request %s failed", request_id)

    def _account(self, scope: Scope, state: dict, request_id: str, status: int, started: float) -> None:
        """Count the request, write its access line, queue its history record."""
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        principal = state.get("principal")  # set by authentication; absent when it refused
        history = state.get("history", {})
        route = scope["route"].path if "route" in scope else metrics.OTHER  # FastAPI's template, bounded
        model = self._model_label(history.get("model"), status)
        metrics.request(route, model, status)
        if self.access_log:
            # One structured line per request; Serve's JSON log adds request_id (X-Request-ID) itself.
            logger.info(
                "%s %s %d %.1fms",
                scope["method"],
                route,
                status,
                latency_ms,
                extra={
                    "http_route": route,  # not "route": Serve's log filter sets that one itself
                    "method": scope["method"],
                    "status": status,
                    "latency_ms": latency_ms,
                    "tenant": principal.owner if principal else None,
                    "model": model,
                    **({"job": history["job_id"]} if "job_id" in history else {}),
                },
            )
        if scope["method"] == "POST" and scope["path"].startswith(RECORDED_PREFIXES):
            self.history.record(
                request_id=request_id,
                endpoint=scope["path"],
                status=status,
                latency_ms=latency_ms,
                owner=principal.owner if principal else None,
                key_id=principal.key_id if principal else None,
                **history,
            )

    def _model_label(self, model: object, status: int) -> str:
        """The model as a metric label: a name that has been answered successfully here, else "other"
        (a request's model name is the client's to choose, so an unknown one must not make a series)."""
        if not isinstance(model, str):
            return metrics.OTHER
        if status < 400:
            self._answered_models.add(model)
            return model
        return model if model in self._answered_models else metrics.OTHER
