"""Direct ingress (INFER_SERVE_DIRECT_INGRESS=1, one node): NGINX in front of each gateway replica's own port.

The shared cluster of `make test` runs without it (Ray then runs a proxy on every node, which the
multi-node tests need), so these tests skip there. Run them on a cluster started with it:

    make down; INFER_SERVE_DIRECT_INGRESS=1 make up
    INFER_SERVE_DIRECT_INGRESS=1 .venv/bin/python -m pytest tests/integration/cluster/test_direct_ingress.py
"""

import re

import httpx
import pytest

from cluster.nodes import ingress_upstreams, serve_details
from tests.integration.helpers import MODEL, listener_pid


@pytest.fixture
def direct(settings) -> list[str]:
    if not settings.serve_direct_ingress:
        pytest.skip("the cluster runs Serve's proxy only (start it with INFER_SERVE_DIRECT_INGRESS=1)")
    upstreams = ingress_upstreams(settings, serve_details(settings))
    assert upstreams, "direct ingress is on, yet no gateway replica has a port of its own"
    return upstreams


def test_nginx_balances_over_the_gateway_replicas_own_ports(direct, settings):
    config = (settings.state_dir / "nginx" / "nginx.conf").read_text()
    upstream = re.search(r"upstream serve_proxies \{(.*?)\}", config, re.S).group(1)
    assert sorted(re.findall(r"server (\S+)", upstream)) == direct


def test_a_request_through_nginx_reaches_a_gateway_replica_directly(direct, settings, api):
    response = api.post("/v1/embeddings", json={"model": MODEL, "input": "direct ingress"})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 384


def test_each_gateway_port_listens_on_loopback_and_asks_for_a_key(direct):
    for upstream in direct:
        host, port = upstream.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert listener_pid(int(port), host=host) is not None
        refused = httpx.post(f"http://{upstream}/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=10)
        assert refused.status_code == 401
        assert httpx.get(f"http://{upstream}/-/healthz", timeout=10).status_code == 200
