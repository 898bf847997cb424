"""ASGI middleware: a request id on every request and response, and a history record (with the caller) per POST."""

from __future__ import annotations

import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.history import HistoryWriter

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RECORDED_PREFIXES = ("/v1/", "/v2/")


class RequestContextMiddleware:
    """Passes through a well-formed X-Request-ID (NGINX sets one) or makes one, and echoes it."""

    def __init__(self, app: ASGIApp, history: HistoryWriter) -> None:
        self.app = app
        self.history = history

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

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["method"] == "POST" and scope["path"].startswith(RECORDED_PREFIXES):
                principal = state.get("principal")  # set by authentication; absent when it refused
                self.history.record(
                    request_id=request_id,
                    endpoint=scope["path"],
                    status=status,
                    latency_ms=round((time.perf_counter() - started) * 1000, 3),
                    owner=principal.owner if principal else None,
                    key_id=principal.key_id if principal else None,
                    **state.get("history", {}),
                )
