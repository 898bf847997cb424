"""What only the bring-up reads: NGINX, TLS, Ray's ports and the development key.

ClusterSettings extends the gateway's Settings (serve_app/settings.py) with these, under the same
INFER_* names, so `make up`, `make status` and the tests see every variable, while the gateway and
the replicas load only what they use.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, computed_field, field_validator

from serve_app.settings import Settings, load_settings


class ClusterSettings(Settings):
    # The public door (NGINX) and the Serve proxies behind it.
    nginx_host: str = "127.0.0.1"
    nginx_port: int = 8080
    nginx_upstreams: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:8000"],
        description="Every node's Serve proxy (host:port) that NGINX balances over.",
    )
    nginx_client_max_body_size: str = "4m"
    nginx_proxy_read_timeout_s: int = Field(75, description="Longer than model_timeout_s, so the gateway's 503 wins.")
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    serve_app_name: str = "inference"
    ready_timeout_s: float = 300.0

    # Ray.
    ray_gcs_port: int = 6380
    ray_node_ip: str = Field("127.0.0.1", description="The head node's address; loopback keeps Ray on this machine.")
    ray_dashboard_host: str = "127.0.0.1"
    ray_dashboard_port: int = 8265
    ray_num_cpus: int | None = None
    ray_metrics_port: int = Field(8090, description="Prometheus metrics of the head node (Ray's and ours).")
    ray_object_store_bytes: int = 512 * 1024 * 1024

    # Worker nodes on this machine (`make up WORKERS=N`); None: as many as are running now.
    workers: int | None = Field(None, ge=0, le=9, description="Ray worker nodes next to the head (ports allow 9).")
    worker_num_cpus: int = Field(1, ge=1, description="CPUs each worker node offers to Ray.")
    worker_proxy_port_base: int = Field(8100, description="Worker node i's Serve proxy listens on base + i.")
    worker_agent_port_base: int = Field(52370, description="Worker node i's dashboard agent: base + i.")

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
    def dashboard_url(self) -> str:
        return f"http://{self.ray_dashboard_host}:{self.ray_dashboard_port}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.ray_gcs_port}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def s3_host(self) -> str:
        return urlparse(self.s3_endpoint).netloc


def load_cluster_settings() -> ClusterSettings:
    return load_settings(ClusterSettings)


@lru_cache
def get_cluster_settings() -> ClusterSettings:
    return load_cluster_settings()
