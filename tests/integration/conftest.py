"""Integration tests run against the real services, brought up by the project's own code.

What `make up` already started is reused; what this session starts, it stops.
"""

import asyncio
import uuid

import httpx
import pytest

from cluster import local
from cluster.secrets import prepared_settings
from cluster.settings import ClusterSettings
from serve_app.auth.credentials import SCOPES
from serve_app.auth.key_store import issue_key


@pytest.fixture(scope="session")
def settings() -> ClusterSettings:
    return prepared_settings()


@pytest.fixture(scope="session", autouse=True)
def cluster(settings):
    started = local.up(settings)
    yield settings
    local.down(settings, only=started)


def create_key(settings: ClusterSettings, owner: str, **options) -> str:
    """A key for `owner` (made if missing), straight through the key store, as the admin CLI does."""
    return asyncio.run(issue_key(settings, owner, "integration tests", **options))


@pytest.fixture(scope="session")
def make_key(settings):
    """make_key(owner, **limits): a key for `owner` (made if missing), straight through the key store."""
    return lambda owner, **options: create_key(settings, owner, **options)


@pytest.fixture(scope="session")
def tenant() -> str:
    """This test session's user: a fresh tenant, so nothing another run left behind is visible."""
    return f"itest-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def api_key(settings, tenant) -> str:
    """Every scope, no limit on requests, work or jobs: the tests of limits make their own keys."""
    return create_key(
        settings,
        tenant,
        name="integration tests",
        scopes=SCOPES,
        rate_per_s=0,
        max_jobs=0,
        token_rate_per_s=0,
        max_inflight_tokens=0,
    )


@pytest.fixture(scope="session")
def auth_headers(api_key) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture(scope="session")
def api(settings, auth_headers):
    """A client of the public door (NGINX), with this session's key."""
    with httpx.Client(base_url=settings.public_url, timeout=120, headers=auth_headers) as client:
        yield client


@pytest.fixture(scope="session")
def anonymous(settings):
    """A client of the public door without any credential."""
    with httpx.Client(base_url=settings.public_url, timeout=30) as client:
        yield client
