"""What the product counts (serve_app/metrics.py), driven through the real code paths with fakes for the
services; that the series reach Prometheus is tests/integration/infra/test_dashboards.py's."""

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest

from deployments.batcher import BatchFormed, PriorityBatcher
from serve_app import metrics
from serve_app.embeddings.cache import ResultCache, cache_key
from serve_app.errors import AuthenticationError, ServiceUnavailableError
from serve_app.history import HistoryWriter
from serve_app.http.errors import refusal_reason
from serve_app.http.middleware import RequestContextMiddleware
from serve_app.infra.redis import GuardedRedis
from serve_app.jobs.store import _ended


def test_every_request_is_counted_by_route_template_model_and_status(client):
    before = metrics.recorded("requests", route="/v1/embeddings", model="fake-model", status="200")
    assert client.post("/v1/embeddings", json={"model": "fake-model", "input": "hello"}).status_code == 200
    assert metrics.recorded("requests", route="/v1/embeddings", model="fake-model", status="200") == before + 1
    # A path no route matches is "other", not the path the client chose.
    before = metrics.recorded("requests", route="other", model="other", status="404")
    assert client.get("/no/such/path/12345").status_code == 404
    assert metrics.recorded("requests", route="other", model="other", status="404") == before + 1


def test_a_model_name_nobody_serves_never_becomes_a_label(client):
    name = "made-up-model-name-4711"
    before = metrics.recorded("requests", route="/v1/embeddings", model="other", status="404")
    assert client.post("/v1/embeddings", json={"model": name, "input": "x"}).status_code == 404
    assert metrics.recorded("requests", route="/v1/embeddings", model="other", status="404") == before + 1
    assert metrics.recorded("requests", route="/v1/embeddings", model=name, status="404") == 0


def test_refusals_are_counted_by_reason(anonymous):
    before = metrics.recorded("auth_refusals", reason="missing")
    assert anonymous.post("/v1/embeddings", json={"model": "fake-model", "input": "x"}).status_code == 401
    assert metrics.recorded("auth_refusals", reason="missing") == before + 1
    before = metrics.recorded("auth_refusals", reason="malformed")
    response = anonymous.post(
        "/v1/embeddings", json={"model": "fake-model", "input": "x"}, headers={"Authorization": "Bearer nope"}
    )
    assert response.status_code == 401
    assert metrics.recorded("auth_refusals", reason="malformed") == before + 1


@pytest.mark.parametrize(
    ("message", "code", "reason"),
    [
        ("API key k1 has been revoked", None, "revoked"),
        ("API key k1 expired at 2026-01-01T00:00:00+00:00", None, "expired"),
        ("invalid API key", None, "unknown_key"),
        ("the session has expired or was ended; log in again", "invalid_session", "invalid_session"),
        ("no API key: send ...", "missing_api_key", "missing"),
    ],
)
def test_the_reason_of_a_refusal_is_one_of_a_closed_list(message, code, reason):
    assert refusal_reason(AuthenticationError(message, code=code)) == reason
    assert reason in metrics.AUTH_REASONS


def test_a_dependency_error_is_counted_by_service_and_an_unknown_service_is_other():
    before = metrics.recorded("dependency_errors", service="rabbitmq")
    ServiceUnavailableError("the job queue is unavailable", service="rabbitmq")
    assert metrics.recorded("dependency_errors", service="rabbitmq") == before + 1
    before = metrics.recorded("dependency_errors", service="other")
    metrics.dependency_error("etcd")
    assert metrics.recorded("dependency_errors", service="other") == before + 1


class FailingRedis:
    async def mget(self, keys):
        raise ConnectionError("Redis is down")


def test_cache_lookups_count_hits_and_misses_by_model_and_a_redis_outage_as_misses_and_an_error():
    class OneHit:
        async def mget(self, keys):
            return [b"blob"] + [None] * (len(keys) - 1)

    keys = [cache_key("m1", "1", t) for t in ("a", "b", "c")]
    hits, misses = (
        metrics.recorded("cache_lookups", model="m1", result="hit"),
        metrics.recorded("cache_lookups", model="m1", result="miss"),
    )
    asyncio.run(ResultCache(GuardedRedis(OneHit(), 1.0), 60).get_many(keys))
    assert metrics.recorded("cache_lookups", model="m1", result="hit") == hits + 1
    assert metrics.recorded("cache_lookups", model="m1", result="miss") == misses + 2

    errors = metrics.recorded("dependency_errors", service="redis")
    asyncio.run(ResultCache(GuardedRedis(FailingRedis(), 1.0), 60).get_many(keys))
    assert metrics.recorded("cache_lookups", model="m1", result="miss") == misses + 5
    assert metrics.recorded("dependency_errors", service="redis") == errors + 1


def test_history_records_dropped_from_a_full_buffer_are_counted():
    writer = HistoryWriter(None, ttl_days=1, batch_size=10, flush_interval_s=1, buffer_size=2)
    before = metrics.recorded("history_dropped")
    for i in range(5):
        writer.record(request_id=str(i))
    assert writer.dropped == 3
    assert metrics.recorded("history_dropped") == before + 3


def test_a_job_that_ends_is_counted_by_state_with_its_duration():
    started = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    before = metrics.recorded("jobs", state="succeeded"), metrics.recorded("job_duration", state="succeeded")
    _ended({"_id": "j1", "status": "succeeded", "started_at": started, "finished_at": started + timedelta(seconds=3)})
    assert metrics.recorded("jobs", state="succeeded") == before[0] + 1
    assert metrics.recorded("job_duration", state="succeeded") == before[1] + 1
    # Cancelled while queued: counted, with no duration (it never ran).
    before = metrics.recorded("jobs", state="cancelled"), metrics.recorded("job_duration", state="cancelled")
    _ended({"_id": "j2", "status": "cancelled", "started_at": None, "finished_at": started})
    assert metrics.recorded("jobs", state="cancelled") == before[0] + 1
    assert metrics.recorded("job_duration", state="cancelled") == before[1]


def test_each_batch_is_reported_after_its_answers_with_its_forward_time_and_a_failed_one_says_so():
    seen: list[BatchFormed] = []

    async def run(requests):
        await asyncio.sleep(0.01)
        if requests[0][0] == "boom":
            raise RuntimeError("the model failed")
        return [len(items) for items in requests]

    async def scenario():
        batcher = PriorityBatcher(run, on_batch=seen.append)
        assert await batcher.submit(["a", "b"], 4) == 2
        with pytest.raises(RuntimeError):
            await batcher.submit(["boom"], 1)

    asyncio.run(scenario())
    assert [(b.items, b.tokens, b.ok) for b in seen] == [(2, 4, True), (1, 1, False)]
    assert all(b.forward_s >= 0.01 for b in seen)
    assert [b.request_ids for b in seen] == [[""], [""]]  # outside a replica there is no Serve request id


def test_unknown_labels_of_closed_lists_are_other():
    assert metrics.known("requests", metrics.LIMITERS) == "requests"
    assert metrics.known("some-new-limiter", metrics.LIMITERS) == metrics.OTHER
    assert metrics.known(None, metrics.JOB_STATES) == metrics.OTHER


class NoHistory:
    def record(self, **fields):
        self.fields = fields


def test_a_request_whose_client_left_is_a_499_in_the_metrics_and_the_access_line_not_a_500(caplog):
    async def leaves(scope, receive, send):
        raise asyncio.CancelledError

    middleware = RequestContextMiddleware(leaves, NoHistory())
    scope = {"type": "http", "method": "GET", "path": "/readyz", "headers": [(b"x-request-id", b"gone-1")]}
    before = metrics.recorded("requests", route="other", model="other", status="499")
    with caplog.at_level(logging.INFO, logger="ray.serve"), pytest.raises(asyncio.CancelledError):
        asyncio.run(middleware(scope, None, None))
    assert metrics.recorded("requests", route="other", model="other", status="499") == before + 1
    [line] = [r for r in caplog.records if getattr(r, "http_route", None)]
    assert (line.status, line.method, line.tenant) == (499, "GET", None)
    assert line.latency_ms >= 0


def test_the_access_line_can_be_turned_off(caplog):
    async def answers(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def ignore(message):
        pass

    middleware = RequestContextMiddleware(answers, NoHistory(), access_log=False)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(middleware({"type": "http", "method": "GET", "path": "/x", "headers": []}, None, ignore))
    assert not [r for r in caplog.records if getattr(r, "http_route", None)]
