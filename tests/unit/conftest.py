"""Fixtures shared by the unit tests: a private Redis, and the gateway app with a fake model."""

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from serve_app.auth.credentials import Principal
from serve_app.http.api import create_app
from serve_app.http.container import Services
from serve_app.http.deps import authenticate
from serve_app.settings import get_settings
from tests.unit.fakes import CALLER, FakeModelHandle, RedisServer


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


CLOSED = "127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture
def handle():
    return FakeModelHandle(name="fake-model", dims=8)


@pytest.fixture
def app(handle, monkeypatch):
    for name, value in {
        "REDIS_URL": f"redis://{CLOSED}/0",
        "MONGO_URL": f"mongodb://{CLOSED}/?directConnection=true",
        "S3_ENDPOINT": f"http://{CLOSED}",
        "REDIS_TIMEOUT_S": "0.2",
        "MONGO_TIMEOUT_S": "0.2",
        "MAX_ITEMS_PER_REQUEST": "4",
        "READINESS_CACHE_S": "0",
    }.items():
        monkeypatch.setenv(f"INFER_{name}", value)
    get_settings.cache_clear()
    services = Services.from_settings(get_settings(), {handle.name: handle})
    yield create_app(services)
    get_settings.cache_clear()


@pytest.fixture
def client(app):
    """A client whose every request is authenticated as CALLER (key lookup is tested in integration)."""

    async def as_caller(request: Request) -> Principal:
        request.state.principal = CALLER
        return CALLER

    app.dependency_overrides[authenticate] = as_caller
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def anonymous(app):
    """A client that authenticates for real (against services that are unreachable)."""
    with TestClient(app) as test_client:
        yield test_client
