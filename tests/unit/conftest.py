"""Fixtures shared by the unit tests."""

import pytest

from tests.unit.fakes import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private Redis for tests of the Lua scripts (skipped where redis-server is not installed)."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The private Redis, emptied for each test."""
    redis_server.client.flushdb()
    return redis_server.url
