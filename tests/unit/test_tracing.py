"""serve_app/tracing.py: the span tree of a gateway request and of a job (in-memory exporter), tracing off by
default, and the OTLP exporter's configuration (nothing is sent)."""

import asyncio
import base64
import logging

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from serve_app import tracing
from serve_app.embeddings.model_client import ModelClient
from serve_app.embeddings.service import EmbeddingService
from serve_app.jobs.queue import Disposition
from serve_app.jobs.runner import JobRunner
from serve_app.jobs.store import JobStatus
from serve_app.settings import Settings
from tests.unit.fakes import DictCache, FakeModelHandle


@pytest.fixture
def spans():
    """Spans of this test, kept in memory (this module's provider only: the global one is never set)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install_for_tests(provider)
    yield exporter
    tracing.install_for_tests(None)
    provider.shutdown()


@pytest.fixture
def untraced(monkeypatch):
    """This process unconfigured, with no endpoint in the environment."""
    monkeypatch.delenv("INFER_OTEL_ENDPOINT", raising=False)
    tracing.install_for_tests(None)
    yield
    tracing.install_for_tests(None)


def by_name(finished) -> dict[str, list]:
    named: dict[str, list] = {}
    for span in finished:
        named.setdefault(span.name, []).append(span)
    return named


def children(finished, parent) -> list:
    return [s for s in finished if s.parent is not None and s.parent.span_id == parent.context.span_id]


# The gateway (spans must come first: the app fixture builds the app, which configures tracing once).


def test_a_request_is_a_server_span_with_its_cache_lookup_and_model_call_as_children(spans, client):
    client.app.state.services.embeddings.cache = DictCache()  # a cache that works (Redis is down here)
    texts = ["one text", "another text"]

    first = client.post("/v1/embeddings", json={"model": "fake-model", "input": texts})
    assert first.status_code == 200, first.text
    finished = spans.get_finished_spans()
    (request,) = [s for s in finished if s.parent is None]
    assert request.name == "POST /v1/embeddings"
    assert request.kind is SpanKind.SERVER
    assert request.attributes["http.request.method"] == "POST"
    assert request.attributes["http.route"] == "/v1/embeddings"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["request.id"] == first.headers["X-Request-ID"]
    assert {s.context.trace_id for s in finished} == {request.context.trace_id}
    named = by_name(children(finished, request))
    assert sorted(named) == ["cache lookup", "model call"]
    (lookup,) = named["cache lookup"]
    assert dict(lookup.attributes) == {"model": "fake-model", "texts": 2, "hits": 0}
    (call,) = named["model call"]
    assert dict(call.attributes) == {"model": "fake-model", "texts": 2, "lane": "interactive", "version": "1"}
    assert lookup.end_time <= call.start_time
    assert len(finished) == 3  # no per-operation spans (dependencies, endpoint, serialization)

    spans.clear()
    second = client.post("/v1/embeddings", json={"model": "fake-model", "input": texts})
    assert second.headers["X-Cache-Hits"] == "2"
    finished = spans.get_finished_spans()
    (request,) = [s for s in finished if s.parent is None]
    assert request.attributes["request.id"] == second.headers["X-Request-ID"]
    assert [s.name for s in children(finished, request)] == ["cache lookup"]  # no model call
    assert children(finished, request)[0].attributes["hits"] == 2


def test_an_incoming_traceparent_is_continued_and_errors_are_marked(spans, client, handle):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    handle.fail = True
    response = client.post(
        "/v1/embeddings", json={"model": "fake-model", "input": "x"}, headers={"traceparent": traceparent}
    )
    assert response.status_code == 503
    finished = spans.get_finished_spans()
    (request,) = [s for s in finished if s.name == "POST /v1/embeddings"]
    assert format(request.context.trace_id, "032x") == trace_id
    assert format(request.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert request.attributes["http.response.status_code"] == 503
    assert request.status.status_code is StatusCode.ERROR


def test_probes_are_not_traced(spans, client):
    assert client.get("/healthz").status_code == 200
    assert spans.get_finished_spans() == ()


def test_a_submission_names_its_job_on_the_request_span(spans):
    """RequestAttributes, under a server span: the request id, and the job id the route put in the history."""

    async def submit(scope, receive, send):
        scope["state"]["history"] = {"job_id": "job-9"}  # what POST /v1/jobs does
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scenario() -> list:
        sent = []

        async def send(message):
            sent.append(message)

        with tracing.span("POST /v1/jobs"):
            await tracing.RequestAttributes(submit)({"type": "http", "state": {"request_id": "r-1"}}, None, send)
        return sent

    assert [m["type"] for m in asyncio.run(scenario())] == ["http.response.start", "http.response.body"]
    (request,) = spans.get_finished_spans()
    assert request.attributes["request.id"] == "r-1"
    assert request.attributes["job.id"] == "job-9"


# A job, run by the real JobRunner over an in-memory store and the unit tests' fake model.


class FakeJobStore:
    """The JobStore methods a JobRunner uses, over dicts."""

    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}
        self.texts: dict[str, list[str]] = {}
        self.ended: dict[str, tuple[JobStatus, dict]] = {}
        self.released: list[str] = []

    def add(self, job_id: str, texts: list[str]) -> None:
        self.docs[job_id] = {
            "_id": job_id,
            "model": "fake-model",
            "input": {"kind": "inline", "count": len(texts)},
            "attempts": 0,
            "request_id": f"submitted-{job_id}",
        }
        self.texts[job_id] = texts

    async def claim(self, job_id: str, worker: dict, lease_owner: str) -> dict:
        self.docs[job_id]["attempts"] += 1
        return dict(self.docs[job_id])

    async def inline_texts(self, job_id: str) -> list[str] | None:
        return self.texts.get(job_id)

    async def record_progress(self, job_id: str, lease_owner: str, done: int, total: int) -> bool:
        return True

    async def cancel_requested(self, job_id: str) -> bool:
        return False

    async def save_inline_result(self, job_id, version, vectors, tokens) -> None:
        pass

    async def finish(self, job_id: str, status: JobStatus, **fields) -> None:
        self.ended[job_id] = (status, fields)

    async def release(self, job_id: str, lease_owner: str, error: str) -> None:
        self.released.append(job_id)


def job_runner(handle: FakeModelHandle, store: FakeJobStore) -> JobRunner:
    client = ModelClient(handle.name, handle, refresh_s=60, timeout_s=5, lane="background")
    embeddings = EmbeddingService({handle.name: client}, DictCache())
    return JobRunner(Settings(job_chunk_size=2, job_max_attempts=3), store, embeddings, objects=None)


def test_a_job_is_a_trace_of_its_own_with_a_span_per_step(spans):
    handle, store = FakeModelHandle(), FakeJobStore()
    store.add("job-1", [f"text {i}" for i in range(5)])
    runner = job_runner(handle, store)

    settlement = asyncio.run(runner.run("job-1"))

    assert settlement.disposition is Disposition.ACK
    assert store.ended["job-1"][0] is JobStatus.SUCCEEDED
    finished = spans.get_finished_spans()
    (job,) = [s for s in finished if s.parent is None]
    assert job.name == "job"
    assert job.attributes["job.id"] == "job-1"
    assert job.attributes["job.disposition"] == "ack"
    assert job.attributes["job.attempt"] == 1
    assert job.attributes["request.id"] == "submitted-job-1"  # the submitting request's, as on its request span
    assert {s.context.trace_id for s in finished} == {job.context.trace_id}
    steps = children(finished, job)
    assert [s.name for s in sorted(steps, key=lambda s: s.start_time)] == [
        "claim",
        "read input",
        "embed chunk",
        "embed chunk",
        "embed chunk",
        "write result",
        "settle",
    ]
    assert all(s.attributes["job.id"] == "job-1" for s in steps)
    named = by_name(steps)
    assert named["read input"][0].attributes["texts"] == 5
    assert sorted((s.attributes["chunk"], s.attributes["texts"]) for s in named["embed chunk"]) == [
        (0, 2),
        (1, 2),
        (2, 1),
    ]
    assert named["settle"][0].attributes["job.status"] == "succeeded"
    for chunk in named["embed chunk"]:  # the embedding service's spans, under each chunk
        under = by_name(children(finished, chunk))
        assert sorted(under) == ["cache lookup", "model call"]
        assert under["model call"][0].attributes["lane"] == "background"


def test_a_failed_attempt_marks_its_chunk_and_settles_as_a_retry(spans):
    handle, store = FakeModelHandle(), FakeJobStore()
    store.add("job-2", ["a", "b"])
    handle.replica_deaths = 2  # the embed call and its retry on another replica both fail

    settlement = asyncio.run(job_runner(handle, store).run("job-2"))

    assert settlement.disposition is Disposition.RETRY
    named = by_name(spans.get_finished_spans())
    (job,) = named["job"]
    assert job.attributes["job.disposition"] == "retry"
    (chunk,) = named["embed chunk"]
    assert chunk.status.status_code is StatusCode.ERROR
    (call,) = named["model call"]
    assert call.status.status_code is StatusCode.ERROR
    assert call.events[0].name == "exception"
    assert named["settle"][0].attributes["job.status"] == "retry"


# Off by default; the OTLP exporter when an endpoint is set.


def test_without_an_endpoint_nothing_is_installed_and_spans_cost_nothing(untraced, app):
    settings = Settings()
    assert settings.otel_endpoint is None
    assert tracing.configure(settings, "gateway") is False
    assert not tracing.enabled()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # the global is untouched
    assert isinstance(tracing.tracer(), trace.NoOpTracer)
    with tracing.span("model call", {"model": "m"}) as span:
        assert not span.is_recording()
        span.set_attribute("hits", 1)  # does nothing
    assert tracing.span("a") is tracing.span("b")  # one shared no-op: nothing made per call
    # The app that the `app` fixture built here has FastAPI's own telemetry off, whatever the globals say.
    assert tracing.fastapi_telemetry() == {"tracing": False, "metrics": False, "logs": False}
    assert not app._native_telemetry.enabled()
    assert tracing.RequestAttributes not in [m.cls for m in app.user_middleware]


def test_the_otlp_exporter_goes_to_the_endpoint_with_credentials_out_of_the_url():
    settings = Settings(
        otel_endpoint="https://tracer:p%40ss@collector.example:4318",
        otel_headers="x-api-key=k3y,x-tenant=a%20b",
        otel_sample_ratio=0.25,
    )
    options = tracing.exporter_options(settings)
    assert options["endpoint"] == "https://collector.example:4318/v1/traces"
    assert options["headers"] == {
        "x-api-key": "k3y",
        "x-tenant": "a b",
        "authorization": "Basic " + base64.b64encode(b"tracer:p@ss").decode(),
    }
    exporter = tracing.build_exporter(settings)
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == "https://collector.example:4318/v1/traces"
    exporter.shutdown()

    provider = tracing.build_provider(settings, "gateway")
    try:
        assert provider.resource.attributes["service.name"] == "gateway"
        assert provider.sampler.get_description().startswith("ParentBased{root:TraceIdRatioBased{0.25}")
    finally:
        provider.shutdown()  # no span was made: nothing is sent


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("http://collector:4318/custom/traces", "http://collector:4318/custom/traces"),
    ],
)
def test_a_bare_collector_address_gets_the_traces_path(url, endpoint):
    assert tracing.exporter_endpoint(url) == (endpoint, None)


def test_configuring_with_an_endpoint_logs_it_without_credentials(untraced, monkeypatch, caplog):
    installed = []
    monkeypatch.setattr(tracing.trace, "set_tracer_provider", installed.append)  # keep the process's global
    monkeypatch.setattr(tracing.atexit, "register", lambda fn: None)
    settings = Settings(otel_endpoint="http://tracer:s3cret@collector:4318/?token=t0ken", otel_headers="k=h3ader")
    with caplog.at_level(logging.INFO, logger="serve_app.tracing"):
        assert tracing.configure(settings, "job-worker") is True
        assert tracing.configure(settings, "other") is True  # once per process: the second changes nothing
    provider = tracing._provider
    try:
        assert tracing.enabled()
        assert provider.resource.attributes["service.name"] == "job-worker"
        assert installed in ([], [provider])
        assert "collector:4318" in caplog.text
        for secret in ("s3cret", "t0ken", "h3ader", "tracer:"):
            assert secret not in caplog.text
    finally:
        tracing.install_for_tests(None)
        provider.shutdown()


def test_a_malformed_header_is_skipped_without_being_shown(caplog):
    with caplog.at_level(logging.WARNING, logger="serve_app.tracing"):
        assert tracing.parse_headers("good=1,s3cret-without-equals,=nameless") == {"good": "1"}
    assert "s3cret" not in caplog.text
    assert "header 2" in caplog.text
