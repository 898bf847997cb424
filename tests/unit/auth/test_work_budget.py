"""The per-key work budget: token estimates, the Lua scripts against a private Redis, and the pacing
of a request's model calls."""

import asyncio
import time

import numpy as np
import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from redis.asyncio import Redis

from serve_app.auth.credentials import Principal
from serve_app.auth.work_budget import WorkBudget, WorkMeter, inflight_key, work_bucket_key
from serve_app.embeddings.catalog import ModelCatalog
from serve_app.embeddings.model_client import ModelClient
from serve_app.embeddings.service import EmbeddingService, estimate_tokens, split_by_tokens
from serve_app.errors import RateLimitError
from serve_app.http.api import create_app
from serve_app.http.container import Services
from serve_app.http.deps import authenticate
from serve_app.infra.redis import GuardedRedis
from serve_app.rerank.service import RerankService
from serve_app.settings import Settings, get_settings
from tests.unit.fakes import DictCache, FakeModelHandle, fake_vector

KEY_ID = "0123456789abcdef"
CLOSED = "127.0.0.1:9"


def principal(rate: float = 0, burst: int = 1, inflight: int = 0, **limits) -> Principal:
    return Principal(
        KEY_ID,
        "alice",
        ("infer",),
        0,
        1,
        0,
        None,
        token_rate_per_s=rate,
        token_burst=burst,
        max_inflight_tokens=inflight,
        **limits,
    )


def work_budget(url: str, **settings) -> WorkBudget:
    """The work budget on the private Redis (made inside the test's event loop)."""
    config = Settings(redis_url=url, **settings)
    return WorkBudget(config, GuardedRedis(Redis.from_url(url), retry_after_s=2.0))


def service(handle: FakeModelHandle, call_max_tokens: int) -> EmbeddingService:
    client = ModelClient(handle.name, handle, refresh_s=60, timeout_s=5)
    return EmbeddingService({handle.name: client}, DictCache(), call_max_tokens=call_max_tokens)


def run(coro):
    return asyncio.run(coro)


# -- estimates and calls ---------------------------------------------------------------------


def test_estimates_cap_at_the_models_truncation_and_count_symbols():
    assert estimate_tokens("x" * 8192) == 256
    assert estimate_tokens("x" * 8192, max_tokens=16) == 16
    assert estimate_tokens("hello world how are you") == 6 + 2  # 23 characters
    assert estimate_tokens(",,,,,,,,") == 2 + 8 + 2  # a tokenizer makes a token of each comma
    assert estimate_tokens("日本語のテキスト") == 2 + 8 + 2
    assert estimate_tokens("," * 300) == 256


def test_calls_hold_at_most_the_token_bound_and_a_big_text_goes_alone():
    texts = ["a", "b", "c", "d", "e"]
    assert split_by_tokens(texts, [100, 300, 200, 50, 256], 512) == [(["a", "b"], 400), (["c", "d", "e"], 506)]
    assert split_by_tokens(["big", "small"], [600, 3], 512) == [(["big"], 600), (["small"], 3)]


# -- the Lua scripts ---------------------------------------------------------------------------


def test_the_work_bucket_charges_and_refuses_with_retry_after_and_ratelimit_headers(redis_url):
    async def scenario():
        budget = work_budget(redis_url)
        first = budget.meter(principal(rate=10, burst=100))
        assert await first.admit(60, 60) == WorkMeter.NOT_ENFORCED  # no in-flight cap: nothing to release
        assert first.headers["x-ratelimit-limit-tokens"] == "100"
        assert first.headers["x-ratelimit-remaining-tokens"] == "40"
        with pytest.raises(RateLimitError) as refused:
            await budget.meter(principal(rate=10, burst=100)).admit(60, 60)
        ttl = await budget.redis.redis.pttl(work_bucket_key(KEY_ID))
        await budget.redis.close()
        return refused.value, ttl

    error, ttl = run(scenario())
    assert (error.status_code, error.code) == (429, "tokens_rate_limited")
    assert error.headers["Retry-After"] == "2"  # 20 tokens short at 10/s
    assert error.headers["x-ratelimit-remaining-tokens"] == "40"
    assert error.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert "work budget" in error.message
    assert 0 < ttl <= 7000  # the bucket lapses once it would be full again


def test_a_request_bigger_than_the_bucket_goes_when_it_is_full_and_leaves_a_debt(redis_url):
    async def scenario():
        budget = work_budget(redis_url)
        big = budget.meter(principal(rate=10, burst=100))
        await big.admit(250, 250)
        with pytest.raises(RateLimitError) as refused:
            await budget.meter(principal(rate=10, burst=100)).admit(1, 1)
        await budget.redis.close()
        return big.headers, refused.value

    headers, error = run(scenario())
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(error.headers["Retry-After"]) >= 15  # 150 tokens of debt, then one, at 10/s


def test_work_not_done_is_refunded(redis_url):
    async def scenario():
        budget = work_budget(redis_url)
        meter = budget.meter(principal(rate=1, burst=100))
        await meter.admit(80, 80)
        await meter.refund(50)
        again = budget.meter(principal(rate=1, burst=100))
        await again.admit(60, 60)  # 70 left: admitted
        await budget.redis.close()
        return again.headers

    assert run(scenario())["x-ratelimit-remaining-tokens"] == "10"


def test_in_flight_leases_are_shared_by_a_keys_requests(redis_url):
    async def scenario():
        budget = work_budget(redis_url)
        one, two = budget.meter(principal(inflight=512)), budget.meter(principal(inflight=512))
        first = await one.lease(300)
        assert first
        assert await two.lease(300) is None  # 600 > 512
        second = await two.lease(200)
        assert second
        await one.release(first)
        third = await two.lease(300)
        assert third
        await two.release(second)
        await two.release(third)
        alone = await one.lease(1000)  # bigger than the cap: goes when the key holds nothing
        assert alone
        assert await two.lease(1) is None
        await one.release(alone)
        await budget.redis.close()

    run(scenario())


def test_a_lease_a_crashed_gateway_never_released_lapses(redis_url):
    async def scenario():
        budget = work_budget(redis_url)
        crashed = budget.meter(principal(inflight=512))
        crashed.lease_ttl_s = 0.2
        assert await crashed.lease(512)  # never released
        assert 0 < await budget.redis.redis.pttl(inflight_key(KEY_ID)) <= 2000
        later = budget.meter(principal(inflight=512))
        assert await later.lease(512) is None
        await asyncio.sleep(0.3)
        assert await later.lease(512)
        await budget.redis.close()

    run(scenario())


def test_without_redis_nothing_is_enforced():
    async def scenario():
        budget = work_budget(f"redis://{CLOSED}/0", redis_timeout_s=0.2)
        meter = budget.meter(principal(rate=1, burst=1, inflight=1))
        assert await meter.admit(10_000, 10_000) == WorkMeter.NOT_ENFORCED
        assert await meter.lease(10_000) == WorkMeter.NOT_ENFORCED
        await budget.redis.close()

    run(scenario())


# -- pacing a request's model calls ------------------------------------------------------------

LONG = ["word " * 1600 + str(i) for i in range(10)]  # 8,000 characters; the fake model truncates at 16 tokens


def test_misses_go_to_the_model_in_short_calls_within_the_keys_allowance(redis_url):
    async def scenario(inflight: int):
        handle = FakeModelHandle()
        handle.delay_s = 0.01
        budget = work_budget(redis_url)
        outcome = await service(handle, call_max_tokens=32).embed(
            handle.name, LONG, meter=budget.meter(principal(rate=1000, burst=10_000, inflight=inflight))
        )
        held = await budget.redis.redis.zcard(inflight_key(KEY_ID))
        await budget.redis.close()
        return handle, outcome, held

    handle, outcome, held = run(scenario(inflight=32))
    assert [len(call) for call in handle.embedded] == [2] * 5  # 16 tokens a text, 32 a call
    assert handle.max_active == 1  # the allowance is one call: one at a time
    assert held == 0  # every lease released
    for i, text in enumerate(LONG):
        np.testing.assert_allclose(outcome.vectors[i], fake_vector("1" + text, handle.dims))
    handle, _, _ = run(scenario(inflight=64))
    assert handle.max_active == 2


def test_cache_hits_cost_nothing_and_skip_the_budget(redis_url):
    async def scenario():
        handle = FakeModelHandle()
        budget = work_budget(redis_url)
        embeddings = service(handle, call_max_tokens=512)
        first = budget.meter(principal(rate=1, burst=1000))
        await embeddings.embed(handle.name, ["a", "b"], meter=first)
        second = budget.meter(principal(rate=1, burst=1000))
        outcome = await embeddings.embed(handle.name, ["a", "b"], meter=second)
        await budget.redis.close()
        return first, second, outcome, handle

    first, second, outcome, handle = run(scenario())
    assert first.charged == 2 * 3  # "a" and "b": a token each, plus two
    assert (second.charged, second.headers, outcome.cache_hits) == (0, {}, 2)
    assert len(handle.embedded) == 1


def test_over_the_budget_is_a_429_before_any_model_work(redis_url):
    async def scenario():
        handle = FakeModelHandle()
        budget = work_budget(redis_url)
        embeddings = service(handle, call_max_tokens=512)
        await embeddings.embed(handle.name, LONG[:2], meter=budget.meter(principal(rate=1, burst=20)))
        calls = len(handle.embedded)
        with pytest.raises(RateLimitError) as refused:
            await embeddings.embed(handle.name, ["one more"], meter=budget.meter(principal(rate=1, burst=20)))
        await budget.redis.close()
        return calls, handle, refused.value

    calls, handle, error = run(scenario())
    assert calls == 1  # 32 tokens with a bucket of 20: admitted when full, into debt
    assert len(handle.embedded) == calls  # the refused request reached no model
    assert int(error.headers["Retry-After"]) >= 12


def test_a_second_heavy_request_of_a_key_waits_for_the_allowance_within_a_bound(redis_url):
    async def scenario(wait_s: float):
        handle = FakeModelHandle()
        handle.delay_s = 0.03
        budget = work_budget(redis_url, inflight_wait_s=wait_s)
        embeddings = service(handle, call_max_tokens=32)
        limits = principal(rate=0, inflight=32)
        heavy = embeddings.embed(handle.name, LONG, meter=budget.meter(limits))
        other = embeddings.embed(handle.name, [t + "!" for t in LONG], meter=budget.meter(limits))
        results = await asyncio.gather(heavy, other, return_exceptions=True)
        await budget.redis.close()
        return handle, results

    handle, results = run(scenario(wait_s=0.05))
    [served] = [r for r in results if not isinstance(r, BaseException)]  # whichever got the allowance first
    [refused] = [r for r in results if isinstance(r, BaseException)]
    assert served.vectors.shape == (10, 8)
    assert isinstance(refused, RateLimitError)
    assert (refused.code, refused.headers["Retry-After"]) == ("inflight_limit_exceeded", "1")
    handle, results = run(scenario(wait_s=10))
    assert all(r.vectors.shape == (10, 8) for r in results)
    assert handle.max_active == 1  # one key, one call at a time, whichever request it belongs to


def test_a_failed_request_gives_back_what_it_did_not_use(redis_url):
    async def scenario():
        handle = FakeModelHandle()
        handle.fail = True
        budget = work_budget(redis_url)
        embeddings = service(handle, call_max_tokens=512)
        handle.fail = False
        await (await embeddings.model(handle.name)).info()  # the model answers info, then fails to embed
        handle.fail = True
        with pytest.raises(Exception, match="unavailable"):
            await embeddings.embed(handle.name, LONG, meter=budget.meter(principal(rate=1, burst=1000)))
        after = budget.meter(principal(rate=1, burst=1000))
        await after.admit(1, 1)
        await budget.redis.close()
        return after.headers

    assert int(run(scenario())["x-ratelimit-remaining-tokens"]) >= 998


def test_rerank_misses_go_in_short_calls_within_the_keys_allowance_too(redis_url):
    """Reranking is paced as embedding is: pairs in calls of at most call_max_tokens, one call at a time
    under an in-flight allowance of one call, the whole cost charged up front."""

    async def scenario():
        handle = FakeModelHandle("fake-reranker", task="rerank")
        handle.delay_s = 0.02
        budget = work_budget(redis_url)
        catalog = ModelCatalog(
            {handle.name: ModelClient(handle.name, handle, refresh_s=60, timeout_s=5)},
            None,
            None,
            refresh_s=60,
            timeout_s=5,
        )
        reranker = RerankService(catalog, DictCache(), call_max_tokens=32)
        meter = budget.meter(principal(rate=1, burst=100_000, inflight=32))
        outcome = await reranker.rerank(handle.name, "a short query", LONG, meter=meter)
        after = budget.meter(principal(rate=1, burst=100_000))
        await after.admit(1, 1)
        await budget.redis.close()
        return handle, outcome, meter.charged, int(after.headers["x-ratelimit-remaining-tokens"])

    handle, outcome, charged, remaining = run(scenario())
    assert [len(docs) for _, docs in handle.reranked] == [2] * 5  # 16 tokens a pair (the model's cap), 32 a call
    assert handle.max_active == 1
    assert [doc for _, docs in handle.reranked for doc in docs] == LONG
    assert outcome.scores.shape == (10,)
    assert charged == 160
    assert 100_000 - remaining - 1 == charged


# -- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture
def stingy_client(redis_url, monkeypatch):
    """The gateway with the private Redis, its caller a key with a work bucket of 40 tokens (1/s)."""
    for name, value in {
        "REDIS_URL": redis_url,
        # This test is about the budget's arithmetic, so Redis must answer. With the default 0.5 s a
        # stall of the shared CI machine once timed the first connect out, and the gateway went on
        # without Redis (as designed, and tested elsewhere): no budget, no headers.
        "REDIS_TIMEOUT_S": "5",
        "MONGO_URL": f"mongodb://{CLOSED}/?directConnection=true",
        "S3_ENDPOINT": f"http://{CLOSED}",
        "MONGO_TIMEOUT_S": "0.2",
        "READINESS_CACHE_S": "0",
    }.items():
        monkeypatch.setenv(f"INFER_{name}", value)
    get_settings.cache_clear()
    handle = FakeModelHandle()
    app = create_app(Services.from_settings(get_settings(), {handle.name: handle}))
    caller = principal(rate=1, burst=40, inflight=512)

    async def as_caller(request: Request) -> Principal:
        request.state.principal = caller
        return caller

    app.dependency_overrides[authenticate] = as_caller
    with TestClient(app) as client:
        yield client, handle
    get_settings.cache_clear()


def test_a_key_over_its_work_budget_gets_a_429_with_headers_and_no_model_work(stingy_client):
    client, handle = stingy_client
    ok = client.post("/v1/embeddings", json={"model": handle.name, "input": LONG[:2]})  # 32 tokens
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-ratelimit-limit-tokens"] == "40"
    assert ok.headers["x-ratelimit-remaining-tokens"] == "8"
    started = time.monotonic()
    refused = client.post("/v1/embeddings", json={"model": handle.name, "input": LONG[2:4]})
    assert time.monotonic() - started < 1
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "tokens_rate_limited")
    assert int(refused.headers["Retry-After"]) >= 24
    assert refused.headers["x-ratelimit-remaining-tokens"] == "8"
    assert len(handle.embedded) == 1
    cached = client.post("/v1/embeddings", json={"model": handle.name, "input": LONG[:2]})
    assert cached.status_code == 200  # cache hits cost nothing, even with the bucket short
    assert cached.headers["X-Cache-Hits"] == "2"


def test_without_redis_a_request_still_keeps_to_the_allowance_itself():
    async def scenario():
        handle = FakeModelHandle()
        handle.delay_s = 0.01
        budget = work_budget(f"redis://{CLOSED}/0", redis_timeout_s=0.2)
        await service(handle, call_max_tokens=32).embed(
            handle.name, LONG, meter=budget.meter(principal(rate=1000, burst=10_000, inflight=32))
        )
        await budget.redis.close()
        return handle

    handle = run(scenario())
    assert len(handle.embedded) == 5
    assert handle.max_active == 1


def test_a_caller_that_leaves_pays_for_the_calls_already_at_the_model(redis_url):
    """Disconnecting must not buy model time: sent calls stay charged; only calls never sent come back."""

    async def scenario():
        handle = FakeModelHandle()
        handle.delay_s = 0.3
        budget = work_budget(redis_url)
        embeddings = service(handle, call_max_tokens=512)
        await (await embeddings.model(handle.name)).info()
        meter = budget.meter(principal(rate=1, burst=100_000, inflight=512))
        request = asyncio.ensure_future(embeddings.embed(handle.name, LONG, meter=meter))
        await asyncio.sleep(0.1)  # the first call is at the model
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        charged = meter.charged
        after = budget.meter(principal(rate=1, burst=100_000))
        await after.admit(1, 1)
        await budget.redis.close()
        return charged, int(after.headers["x-ratelimit-remaining-tokens"])

    charged, remaining = run(scenario())
    assert charged > 0  # the call that was sent
    assert 100_000 - remaining - 1 == pytest.approx(charged, abs=1)
