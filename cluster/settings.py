"""What only the bring-up reads: NGINX, TLS, Ray's ports and the development key.

ClusterSettings extends the gateway's Settings (serve_app/settings.py) with these, under the same
INFER_* names, so `make up`, `make status` and the tests see every variable, while the gateway and
the replicas load only what they use.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse, urlunparse

from pydantic import Field, computed_field, field_validator, model_validator

from cluster import netns
from serve_app.settings import Settings, load_settings

# The settings that name a stateful service; a worker node in a namespace of its own reaches them
# at the bridge address instead of loopback.
SERVICE_URLS = ("redis_url", "mongo_url", "rabbitmq_url", "s3_endpoint")


class ClusterSettings(Settings):
    # The public door (NGINX) and the Serve proxies behind it.
    nginx_host: str = "127.0.0.1"
    nginx_port: int = 8080
    nginx_upstreams: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:8000"],
        description="Every node's Serve proxy (host:port) that NGINX balances over.",
    )
    nginx_client_max_body_size: str = "4m"
    nginx_model_push_max_body_size: str = Field("4g", description="A model archive pushed to /v1/admin/models.")
    nginx_proxy_read_timeout_s: int = Field(75, description="Longer than model_timeout_s, so the gateway's 503 wins.")
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    serve_app_name: str = "inference"
    serve_direct_ingress: bool = Field(
        True,
        description="Ray Serve's direct ingress: NGINX sends each request straight to a gateway replica's own HTTP "
        "port (serve_direct_ingress_ports), with the head node's Serve proxy as its backup; 14 ms less per "
        "request and 1.6x the single-text throughput of going through the proxy (docs/benchmarks.md). "
        "False: NGINX balances over a Serve proxy on every node.",
    )
    serve_direct_ingress_ports: tuple[int, int] = Field(
        (30000, 31000), description="The range Serve gives gateway replicas their HTTP ports from (on every node)."
    )
    ready_timeout_s: float = 300.0

    # Ray.
    ray_gcs_port: int = 6380
    ray_node_ip: str = Field(
        "", description="The head node's address. Default (empty): 127.0.0.1, or the bridge address (netns layout)."
    )
    ray_dashboard_host: str = "127.0.0.1"
    ray_dashboard_port: int = 8265
    ray_num_cpus: int | None = None
    ray_metrics_port: int = Field(8090, description="Prometheus metrics of the head node (Ray's and ours).")
    ray_dashboard_metrics_port: int = Field(44227, description="The dashboard's own Prometheus metrics.")
    ray_autoscaler_metrics_port: int = Field(44217, description="The autoscaler monitor's Prometheus metrics.")
    ray_object_store_bytes: int = 512 * 1024 * 1024

    # Prometheus (`make up` starts it on loopback): Ray's metrics (ours among them) and RabbitMQ's.
    prometheus_host: str = Field("127.0.0.1", description="Loopback only: Prometheus asks for no credential.")
    prometheus_port: int = 9090
    prometheus_scrape_interval_s: int = Field(10, ge=1, description="How often Prometheus scrapes every target.")
    prometheus_retention: str = Field(
        "15d", description="How long Prometheus keeps samples (--storage.tsdb.retention.time)."
    )
    rabbitmq_prometheus_port: int = Field(15692, description="RabbitMQ's rabbitmq_prometheus endpoint (loopback).")
    grafana_url: str | None = Field(
        None,
        description="A Grafana that shows this cluster (cluster/monitoring/grafana/): the Ray dashboard embeds its "
        "panels (RAY_GRAFANA_HOST). None here: no Grafana runs on these machines.",
    )

    # Worker nodes on this machine (`make up WORKERS=N`); None: as many as are running now.
    workers: int | None = Field(None, ge=0, le=9, description="Ray worker nodes next to the head (ports allow 9).")
    worker_num_cpus: int = Field(1, ge=1, description="CPUs each worker node offers to Ray.")
    worker_proxy_port_base: int = Field(8100, description="Worker node i's Serve proxy listens on base + i.")
    worker_agent_port_base: int = Field(52370, description="Worker node i's dashboard agent: base + i.")
    node_network: Literal["auto", "colocated", "netns"] = Field(
        "auto",
        description="Where worker nodes live: next to the head on loopback (colocated), or each in a network "
        "namespace of its own on a bridge (netns; needs root). auto: netns where root, else colocated.",
    )
    node_subnet: ipaddress.IPv4Network = Field(
        ipaddress.IPv4Network("10.77.0.0/24"),
        description="The node network of the netns layout: the head (bridge) is .1, worker node i is .(10+i).",
    )

    # TLS and NGINX's outer shield (per client address, before any key is looked at).
    nginx_tls_port: int | None = Field(8443, description="HTTPS port; None turns TLS off.")
    tls_cert_file: Path | None = Field(None, description="Certificate chain (PEM); default: a local CA's.")
    tls_key_file: Path | None = Field(None, description="Its private key (PEM); default: made by the bring-up.")
    nginx_http_redirect: bool | None = Field(
        None, description="Redirect HTTP to HTTPS; default: yes unless NGINX listens on loopback only."
    )
    nginx_limit_req_per_s: int = 2000
    nginx_limit_req_burst: int = 4000
    nginx_limit_conn: int = 512
    nginx_header_buffers: str = Field("4 16k", description="large_client_header_buffers: bigger headers get 431.")

    @field_validator("nginx_tls_port", mode="before")
    @classmethod
    def _tls_off(cls, value: object) -> object:
        """INFER_NGINX_TLS_PORT=off (or none, null) turns TLS off, as the README says; empty is an error."""
        if isinstance(value, str) and value.strip().lower() in ("off", "none", "null"):
            return None
        return value

    @field_validator("prometheus_host")
    @classmethod
    def _loopback_only(cls, value: str) -> str:
        """Prometheus asks for no credential (nor does its UI and API): it may listen on loopback only."""
        try:
            loopback = value == "localhost" or ipaddress.ip_address(value).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"{value!r} is not a loopback address: Prometheus asks for no credential")
        return value

    @model_validator(mode="after")
    def _node_ip(self) -> ClusterSettings:
        if not self.ray_node_ip:
            self.ray_node_ip = self.bridge_address if self.netns_layout else "127.0.0.1"
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def netns_layout(self) -> bool:
        """Worker nodes in network namespaces of their own (see cluster/netns.py)."""
        if self.node_network == "auto":
            return netns.available()
        return self.node_network == "netns"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bridge_address(self) -> str | None:
        """The head's address on the node network (netns layout only)."""
        return netns.bridge_address(self.node_subnet) if self.netns_layout else None

    def bind_hosts(self, host: str) -> list[str]:
        """Where a stateful service named by `host` listens: there, and on the bridge too in the netns layout
        (worker nodes reach it there), when `host` is loopback."""
        if self.bridge_address and _is_loopback(host) and host != self.bridge_address:
            return [host, self.bridge_address]
        return [host]

    def unguarded_ray_ports(self) -> list[int]:
        """The head's Prometheus endpoints: Ray binds them to every address when the node address is not
        loopback (netns layout), so the bring-up admits them only from loopback and the node bridge."""
        return [self.ray_metrics_port, self.ray_dashboard_metrics_port, self.ray_autoscaler_metrics_port]

    def node_service_env(self) -> dict[str, str]:
        """INFER_* URLs of the stateful services as a worker node in its own namespace must dial them."""
        if not self.bridge_address:
            return {}
        env = {}
        for name in SERVICE_URLS:
            url = urlparse(getattr(self, name))
            if url.hostname and _is_loopback(url.hostname):
                netloc = url.netloc.rsplit("@", 1)
                host_port = netloc[-1].replace(url.hostname, self.bridge_address, 1)
                netloc = "@".join([*netloc[:-1], host_port])
                env[f"INFER_{name.upper()}"] = urlunparse(url._replace(netloc=netloc))
        return env

    # The local services.
    rabbitmq_epmd_port: int = Field(4370, description="The local RabbitMQ's own epmd (Erlang port mapper).")
    dev_owner: str = Field("dev", description="The user `make up` creates its development key for.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tls_ca_file(self) -> Path:
        """The local CA that signs the self-signed certificate (clients trust it with --cacert)."""
        return self.tls_dir / "ca.pem"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tls_certificate(self) -> Path:
        return self.tls_cert_file or self.tls_dir / "server.pem"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tls_private_key(self) -> Path:
        return self.tls_key_file or self.tls_dir / "server.key"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def redirects_http(self) -> bool:
        if self.nginx_tls_port is None:
            return False
        if self.nginx_http_redirect is not None:
            return self.nginx_http_redirect
        return not self.nginx_host.startswith("127.") and self.nginx_host not in ("localhost", "::1")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def http_url(self) -> str:
        return f"http://{self.nginx_host}:{self.nginx_port}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def https_url(self) -> str | None:
        return f"https://{self.nginx_host}:{self.nginx_tls_port}" if self.nginx_tls_port else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def public_url(self) -> str:
        """Where clients go: HTTPS when plain HTTP only redirects, else HTTP."""
        return self.https_url if self.redirects_http and self.https_url else self.http_url

    @computed_field  # type: ignore[prop-decorator]
    @property
    def dev_key_file(self) -> Path:
        return self.state_dir / "api-key"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def serve_url(self) -> str:
        return f"http://{self.serve_host}:{self.serve_port}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def prometheus_url(self) -> str:
        return f"http://{self.prometheus_host}:{self.prometheus_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.ray_dashboard_host}:{self.ray_dashboard_port}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ray_address(self) -> str:
        return f"{self.ray_node_ip}:{self.ray_gcs_port}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def s3_host(self) -> str:
        return urlparse(self.s3_endpoint).netloc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_cluster_settings() -> ClusterSettings:
    return load_settings(ClusterSettings)


@lru_cache
def get_cluster_settings() -> ClusterSettings:
    return load_cluster_settings()
