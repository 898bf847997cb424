"""Direct ingress (the default; INFER_SERVE_DIRECT_INGRESS=0 turns it off): NGINX in front of each gateway
replica's own port, with the head node's Serve proxy as the backup.

Skipped on a cluster started without it.
"""

import re

import httpx
import pytest

from cluster.nodes import ingress_upstreams, serve_details
from tests.integration.helpers import MODEL, listener_pid


@pytest.fixture
def direct(settings) -> list[str]:
    if not settings.serve_direct_ingress:
        pytest.skip("the cluster runs Serve's proxies only (started with INFER_SERVE_DIRECT_INGRESS=0)")
    upstreams = ingress_upstreams(settings, serve_details(settings))
    assert upstreams, "direct ingress is on, yet no gateway replica has a port of its own"
    return upstreams


def test_nginx_balances_over_the_gateway_replicas_own_ports_with_the_proxy_as_backup(direct, settings):
    config = (settings.state_dir / "nginx" / "nginx.conf").read_text()
    upstream = re.search(r"upstream serve_proxies \{(.*?)\}", config, re.S).group(1)
    servers = re.findall(r"server (\S+)( backup)?", upstream)
    assert sorted(address for address, backup in servers if not backup) == direct
    assert [address for address, backup in servers if backup] == [f"{settings.serve_host}:{settings.serve_port}"]


def test_a_request_through_nginx_reaches_a_gateway_replica_directly(direct, settings, api):
    response = api.post("/v1/embeddings", json={"model": MODEL, "input": "direct ingress"})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 384


def test_each_gateway_port_asks_for_a_key_and_listens_on_loopback_or_the_node_network(direct, settings):
    for upstream in direct:
        host, port = upstream.rsplit(":", 1)
        if host == settings.serve_host:  # this machine's node: the port is on loopback only
            assert host == "127.0.0.1"
            assert listener_pid(int(port), host=host) is not None
        else:  # a worker node's namespace, reached over the node network (cluster/netns.py)
            assert settings.netns_layout
        refused = httpx.post(f"http://{upstream}/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=10)
        assert refused.status_code == 401
        assert httpx.get(f"http://{upstream}/-/healthz", timeout=10).status_code == 200
