"""Integration tests run against the real services, brought up by the project's own code.

What `make up` already started is reused; what this session starts, it stops.
"""

import httpx
import pytest

from cluster import local
from serve_app.settings import Settings, get_settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session", autouse=True)
def cluster(settings):
    started = local.up(settings)
    yield settings
    local.down(settings, only=started)


@pytest.fixture(scope="session")
def api(settings):
    """A client of the public door (NGINX)."""
    with httpx.Client(base_url=settings.public_url, timeout=120) as client:
        yield client
