"""OpenTelemetry traces: a span per gateway request, cache lookup, model call and job step, sent over OTLP/HTTP.

Off by default: without INFER_OTEL_ENDPOINT nothing is set up, `span()` hands back one shared no-op
context manager (no span object, no context switch: the cost of a function call) and FastAPI's own
telemetry is switched off for the gateway's app. With it, `configure()` (the first call in a process wins;
later ones are no-ops) installs a TracerProvider (resource service.name, ParentBased(TraceIdRatioBased)
sampling) with a BatchSpanProcessor and an OTLPSpanExporter to `<endpoint>/v1/traces`, and the gateway's
request spans come from FastAPI's native OpenTelemetry support (`fastapi_telemetry()`).

A trace follows one process's work: a client's W3C traceparent is continued by the gateway's request span,
but nothing is carried over a Ray Serve handle call (the gateway's "model call" span times the call; the
model replica makes no spans) nor through RabbitMQ (a job's spans are a trace of their own; the request that
submitted it and the job share the job.id attribute).

The provider is held here, not only as OpenTelemetry's global (which can be set once per process):
`tracer()` and `span()` read this module's, so the tests can swap in an in-memory one
(`install_for_tests`) as often as they like. The global is set too when nothing else set it (so other
instrumentation in the process reports to the same place); Ray Serve's own tracing, when someone turns
it on, sets it first and keeps it.

A credential never reaches a log: user:password in the endpoint URL is taken out of the URL and sent
as a Basic Authorization header instead, and the endpoint is logged without it; INFER_OTEL_HEADERS
(or the secret file <state_dir>/secrets/infer_otel_headers), `name=value,...` as in
OTEL_EXPORTER_OTLP_HEADERS, adds headers (an API key) and is never logged.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import logging
import os
import threading
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, Tracer

if TYPE_CHECKING:
    from fastapi.telemetry import TelemetryConfig
    from opentelemetry.sdk.trace import TracerProvider
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from serve_app.settings import Settings

logger = logging.getLogger(__name__)

TRACER_NAME = "serve_app"
SERVICE_NAMESPACE = "inference-cluster"
TRACES_PATH = "v1/traces"
# Probes would make a trace each every few seconds and say nothing: not traced.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz"})
REQUEST_ID_ATTRIBUTE = "request.id"
JOB_ID_ATTRIBUTE = "job.id"

_lock = threading.Lock()
_configured = False  # configure() ran (or a test installed a provider): later calls change nothing
_provider: TracerProvider | None = None  # ours, while tracing is on
_tracer: Tracer | None = None  # None: off
_OFF = contextlib.nullcontext(INVALID_SPAN)  # reusable; set_attribute & co. on it do nothing


def configure(settings: Settings, service_name: str) -> bool:
    """Tracing for this process as the settings say, once; whether it is on. Idempotent and cheap to repeat."""
    global _configured
    if _configured:
        return _tracer is not None
    with _lock:
        if _configured:
            return _tracer is not None
        _configured = True
        if not settings.otel_endpoint:
            return False
        provider = build_provider(settings, service_name)
        _use(provider)
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # nobody set the global yet
            trace.set_tracer_provider(provider)
        atexit.register(provider.shutdown)  # what the batch still holds goes out on exit
        logger.info(
            "tracing on: %s sends spans to %s (sampled %.0f%%)",
            service_name,
            redact(settings.otel_endpoint),
            100 * settings.otel_sample_ratio,
        )
        return True


def build_provider(settings: Settings, service_name: str) -> TracerProvider:
    """A TracerProvider exporting in batches over OTLP/HTTP to settings.otel_endpoint (which must be set)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if not settings.otel_endpoint:
        raise ValueError("no OTLP endpoint: tracing is off")
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": service_name, "service.namespace": SERVICE_NAMESPACE, "process.pid": os.getpid()}
        ),
        sampler=ParentBased(TraceIdRatioBased(settings.otel_sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(build_exporter(settings)))
    return provider


def build_exporter(settings: Settings):
    """The OTLP/HTTP span exporter for the settings (it sends nothing until spans are exported)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(**exporter_options(settings))


def exporter_options(settings: Settings) -> dict[str, Any]:
    """OTLPSpanExporter's endpoint and headers: INFER_OTEL_HEADERS, and Basic auth for user:password in the URL."""
    headers = parse_headers(settings.otel_headers.get_secret_value()) if settings.otel_headers else {}
    endpoint, auth = exporter_endpoint(settings.otel_endpoint or "")
    if auth is not None:
        headers.setdefault("authorization", auth)
    return {"endpoint": endpoint, "headers": headers}


def parse_headers(text: str) -> dict[str, str]:
    """`name=value,...` (values URL-decoded, as OTEL_EXPORTER_OTLP_HEADERS); a malformed entry is skipped
    with a warning that never shows it (it may hold a key)."""
    headers: dict[str, str] = {}
    for number, entry in enumerate(text.split(","), 1):
        name, equals, value = entry.partition("=")
        if not entry.strip():
            continue
        if not equals or not name.strip():
            logger.warning("tracing: OTLP header %d is not name=value; skipped", number)
            continue
        headers[unquote(name).strip().lower()] = unquote(value).strip()
    return headers


def exporter_endpoint(url: str) -> tuple[str, str | None]:
    """(the traces URL without credentials, a Basic Authorization header value for its user:password or None).

    A bare collector address (`http://collector:4318`, as OTEL_EXPORTER_OTLP_ENDPOINT takes it) gets the
    signal path `/v1/traces`; a URL with a path is used as given.
    """
    parts = urlsplit(url.strip())
    auth = None
    if parts.username is not None or parts.password is not None:
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
    netloc = parts.netloc.rpartition("@")[2]
    path = parts.path if parts.path not in ("", "/") else "/" + TRACES_PATH
    return urlunsplit((parts.scheme, netloc, path, parts.query, "")), auth


def redact(url: str) -> str:
    """The URL as it may be logged: no user:password, no query (which may carry a token)."""
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def enabled() -> bool:
    return _tracer is not None


def tracer() -> Tracer:
    """This process's tracer; OpenTelemetry's no-op one while tracing is off."""
    return _tracer or trace.NoOpTracer()


def span(
    name: str, attributes: Mapping[str, Any] | None = None, **options: Any
) -> contextlib.AbstractContextManager[Span]:
    """`with span("cache lookup", {...}) as s:` a child of the current span, made current; while tracing is
    off, a shared no-op (s.set_attribute does nothing). `options` go to Tracer.start_as_current_span
    (set_status_on_exception=False: an exception that is an expected outcome does not mark the span failed)."""
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, attributes=attributes, **options)


def fastapi_telemetry() -> TelemetryConfig:
    """`FastAPI(telemetry=...)`: FastAPI's own OpenTelemetry support, wired to this process's provider.

    On: a server span per HTTP request, named by the route's template (`POST /v1/embeddings`), with
    http.request.method, http.route, http.response.status_code, an incoming W3C traceparent continued,
    5xx and exceptions marked as errors; no FastAPI metrics or logs (Prometheus and the replica logs have
    those), no per-operation spans (dependencies, endpoint, serialization), probes not traced. Off: all of
    it off, whatever global providers the process has (FastAPI's per-request check then costs nothing).
    Add `RequestAttributes` inside RequestContextMiddleware for the request id.
    """
    if _provider is None:
        return {"tracing": False, "metrics": False, "logs": False}
    return {
        "tracer_provider": _provider,
        "metrics": False,
        "logs": False,
        "operation_spans": False,
        "auto_configure": False,
        "exclude": _untraced,
    }


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in UNTRACED_PATHS


class RequestAttributes:
    """ASGI middleware, added inside RequestContextMiddleware: the request's id on its server span, and the
    id of the job a submission made (so the request's trace and the job's are found by the same job.id)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        current = trace.get_current_span()
        if not current.is_recording():
            await self.app(scope, receive, send)
            return
        state = scope.get("state", {})
        if request_id := state.get("request_id"):
            current.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)

        async def send_noting_job(message: Message) -> None:
            # The server span ends with the response's last byte: the route has said what it made by its start.
            if message["type"] == "http.response.start" and (job_id := state.get("history", {}).get("job_id")):
                current.set_attribute(JOB_ID_ATTRIBUTE, job_id)
            await send(message)

        await self.app(scope, receive, send_noting_job)


def _use(provider: TracerProvider | None) -> None:
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer(TRACER_NAME) if provider is not None else None


def install_for_tests(provider: TracerProvider | None) -> None:
    """Tests only: spans go to `provider` (e.g. with an InMemorySpanExporter) from now on, as if configured;
    None puts this process back to unconfigured. Never touches OpenTelemetry's global provider."""
    global _configured
    with _lock:
        _use(provider)
        _configured = provider is not None
