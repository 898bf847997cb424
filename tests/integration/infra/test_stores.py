"""The result cache against real Redis and the history writer against real MongoDB."""

import asyncio
import time
import uuid

import numpy as np
import pytest
from redis import Redis

from serve_app.embeddings.cache import ResultCache, cache_key, pack, unpack
from serve_app.history import HistoryWriter
from serve_app.infra.mongo import mongo_client
from serve_app.infra.redis import GuardedRedis


def test_cache_stores_with_ttl_and_reads_back(settings):
    async def scenario():
        guard = GuardedRedis.from_settings(settings)
        cache = ResultCache(guard, settings.cache_ttl_s)
        key = cache_key("test", "1", uuid.uuid4().hex)
        vector = np.arange(384, dtype=np.float32)
        try:
            assert await cache.get_many([key]) == [None]
            await cache.put_many({key: pack(vector, 5)})
            [blob] = await cache.get_many([key])
        finally:
            await guard.close()
        return key, blob

    key, blob = asyncio.run(scenario())
    restored, tokens = unpack(blob)
    np.testing.assert_array_equal(restored, np.arange(384, dtype=np.float32))
    assert tokens == 5
    ttl = Redis.from_url(settings.redis_url, **settings.redis_options()).ttl(key)
    assert 0 < ttl <= settings.cache_ttl_s


class Untouchable:
    """Stands in for the Redis client while the cache must leave Redis alone."""

    def __getattr__(self, name):
        raise AssertionError(f"Redis was called ({name}) during the skip window")


def test_cache_without_redis_misses_then_leaves_redis_alone_then_recovers(settings):
    async def scenario():
        guard = GuardedRedis.from_settings(settings.model_copy(update={"redis_url": "redis://127.0.0.1:9/0"}))
        cache = ResultCache(guard, settings.cache_ttl_s)
        assert await cache.get_many(["a", "b"]) == [None, None]  # refused: a miss, not an error
        assert not guard.available
        await guard.close()
        guard.redis = Untouchable()
        assert await cache.get_many(["a"]) == [None]
        await cache.put_many({"a": b"x"})
        guard.redis = GuardedRedis.from_settings(settings).redis  # Redis is back
        await guard.ping()
        assert guard.available
        await cache.put_many({"recovered": b"x"})
        assert await cache.get_many(["recovered"]) == [b"x"]
        await guard.close()

    asyncio.run(scenario())


def _writer(settings, collection, **overrides):
    client = mongo_client(settings)
    options = {"ttl_days": 7, "flush_interval_s": 0.1, "batch_size": 500, "buffer_size": 10_000, **overrides}
    return client, HistoryWriter(client[settings.mongo_db][collection], **options)


def test_history_is_written_in_bulk_with_indexes(settings):
    collection = f"test_history_{uuid.uuid4().hex[:8]}"

    async def scenario():
        client, writer = _writer(settings, collection)
        writer.start()
        for i in range(1200):
            writer.record(request_id=f"r{i}", model="m", items=1, status=200)
        deadline = time.monotonic() + 10
        # The background task writes; the test only watches it do so.
        while writer.written < 1200 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await writer.stop()
        count = await client[settings.mongo_db][collection].count_documents({})
        indexes = {i["name"]: i async for i in await client[settings.mongo_db][collection].list_indexes()}
        await client[settings.mongo_db][collection].drop()
        await client.close()
        return count, indexes

    count, indexes = asyncio.run(scenario())
    assert count == 1200
    assert indexes["ts_ttl"]["expireAfterSeconds"] == 7 * 86400
    assert {"request_id", "model_ts"} <= set(indexes)


def test_history_ttl_change_is_applied_to_the_existing_index(settings):
    collection = f"test_history_{uuid.uuid4().hex[:8]}"

    async def scenario():
        client, first = _writer(settings, collection, ttl_days=7)
        await first.ensure_indexes()
        _, second = _writer(settings, collection, ttl_days=3)
        second.collection = first.collection
        await second.ensure_indexes()
        indexes = {i["name"]: i async for i in await first.collection.list_indexes()}
        await first.collection.drop()
        await client.close()
        return indexes

    assert asyncio.run(scenario())["ts_ttl"]["expireAfterSeconds"] == 3 * 86400


def test_history_without_mongodb_buffers_and_bounds_memory(settings):
    async def scenario():
        down = settings.model_copy(
            update={"mongo_url": "mongodb://127.0.0.1:9/?directConnection=true", "mongo_timeout_s": 0.2}
        )
        client, writer = _writer(down, "unused", buffer_size=100)
        writer.start()
        for i in range(150):
            writer.record(request_id=f"r{i}")
        await asyncio.sleep(0.5)
        await writer.stop(timeout_s=0.5)
        await client.close()
        return writer

    writer = asyncio.run(scenario())
    assert writer.written == 0
    assert len(writer.buffer) == 100
    assert writer.dropped == 50
    assert writer.buffer[0]["request_id"] == "r50", "the oldest records are the ones dropped"


@pytest.mark.parametrize("name", ["redis", "mongodb", "object_store", "rabbitmq", "ray", "nginx"])
def test_every_service_answers(settings, name):
    from cluster.services import all_services

    [service] = [s for s in all_services(settings) if s.name == name]
    assert service.answers(), f"{name} does not answer on {service.address}"
