"""What the gateway and the replicas read: every service endpoint and credential, limit and timeout.

All from INFER_* variables (and, locally, files under <state_dir>/secrets/). What only the
bring-up needs (NGINX, TLS, Ray's ports, the development key) is cluster/settings.py's
ClusterSettings, which extends this class with the same INFER_ names.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, SecretStr, computed_field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFER_", env_file=None, extra="ignore")

    # Where the local bring-up keeps pid files, logs, data dirs and rendered configs; replicas read
    # credentials from its secrets/ and cache weights under it.
    state_dir: Path = REPO_ROOT / ".cluster"

    readiness_cache_s: float = Field(1.0, description="Probes of /readyz share one set of checks this long.")

    # Stateful services. Credentials come from the environment or, locally, from files the bring-up
    # writes into <state_dir>/secrets/ (one per variable, named like it in lower case, mode 0600).
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretStr | None = None
    redis_timeout_s: float = 0.5
    redis_retry_after_s: float = Field(2.0, description="After a Redis error, skip Redis this long.")
    cache_ttl_s: int = 24 * 3600
    mongo_url: str = "mongodb://127.0.0.1:27017/?directConnection=true"
    mongo_db: str = "inference"
    mongo_username: str = "infer"
    mongo_password: SecretStr | None = None
    mongo_auth_source: str = "admin"
    mongo_timeout_s: float = 2.0
    history_ttl_days: int = 30
    history_flush_interval_s: float = 0.5
    history_batch_size: int = 500
    history_buffer_size: int = 50_000
    system_log_enabled: bool = Field(
        True, description="Copy system events to MongoDB's system_logs (serve_app/events.py)."
    )
    system_log_ttl_days: int = Field(14, ge=1, description="How long system_logs keeps an event.")
    access_log: bool = Field(
        True, description="One structured line per request in the gateway replica's log (route, status, latency)."
    )
    rabbitmq_url: str = Field("amqp://127.0.0.1:5672/infer", description="Host, port and vhost (the path).")
    rabbitmq_heartbeat_s: int = Field(
        15,
        ge=0,
        description="AMQP heartbeat: a consumer cut off is dropped (its jobs redelivered) after about 2x this.",
    )
    rabbitmq_username: str = "infer"
    rabbitmq_password: SecretStr | None = None
    s3_endpoint: str = "http://127.0.0.1:9000"
    s3_access_key: str = "minioadmin"
    s3_secret_key: SecretStr = SecretStr("minioadmin")
    s3_region: str = "us-east-1"
    s3_public_endpoint: str | None = Field(
        None, description="Endpoint put in presigned URLs given to clients; default: s3_endpoint."
    )
    model_bucket: str = "models"

    # Models.
    default_model: str = "all-minilm-l6-v2"
    default_model_version: str = "1"
    model_cache_dir: Path | None = Field(None, description="Node-local weight cache; default <state_dir>/model-cache.")
    model_cache_max_gb: float = Field(
        20.0,
        ge=0,
        description="The node cache is pruned to this size after each fetch, least recently used versions "
        "first (0: never pruned).",
    )
    model_info_refresh_s: float = 2.0
    model_timeout_s: float = 60.0
    job_model_timeout_s: float = Field(
        600.0,
        description="How long a job's model call may take: its chunks wait in the background lane while people's "
        "requests go first, so they may wait much longer than a person would.",
    )
    model_push_max_bytes: int = Field(4 * 2**30, description="The largest model archive POSTed to /v1/admin/models.")
    model_listing_ttl_s: float = Field(
        5.0, description="How long a gateway trusts its listing of a model's versions in the repository."
    )

    # Request limits.
    max_items_per_request: int = 256
    max_text_chars: int = 8192

    # Asynchronous jobs.
    job_queue: str = "jobs"
    job_bucket: str = "jobs"
    job_max_inline_items: int = 5000
    job_max_items: int = 100_000
    job_max_input_bytes: int = 256 * 1024 * 1024
    job_chunk_size: int = 64
    job_parallel_chunks: int = Field(8, description="Model calls in flight per job (a sliding window).")
    job_inline_result_max_items: int = 1000
    job_max_attempts: int = 3
    job_retry_delay_s: float = Field(2.0, description="First retry delay; doubles with each attempt.")
    job_prefetch: int = 2
    job_lease_s: float = Field(30.0, description="A running job's claim; renewed with every progress write.")
    job_max_inline_bytes: int = Field(8 * 1024 * 1024, description="Total UTF-8 bytes of inline job input.")
    job_status_ttl_s: int = 300
    job_presign_expiry_s: int = 3600
    job_sweep_interval_s: float = 10.0
    job_publish_grace_s: float = Field(30.0, description="A job still unpublished after this is published again.")
    callback_timeout_s: float = 10.0
    callback_max_attempts: int = 4
    callback_retry_delay_s: float = 0.5
    callback_allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs callbacks may go to besides public addresses (local development, tests); default none.",
    )
    callback_concurrency: int = Field(32, description="Callback deliveries in flight per job-worker replica.")
    callback_per_destination: int = Field(4, description="Of those, to one host:port.")
    callback_per_tenant: int = Field(8, description="Of those, for one tenant.")

    # Authentication and per-key limits (a key's own limits, when set, win over these defaults).
    auth_cache_ttl_s: float = Field(
        10.0, description="A key lookup is cached in Redis this long: the bound on a revocation Redis missed."
    )
    session_ttl_s: int = Field(3600, description="Lifetime of a session token from POST /v1/auth/login.")
    rate_limit_per_s: float = Field(100.0, description="Requests per second per key (token bucket); 0: unlimited.")
    rate_limit_burst: int = Field(200, description="Token bucket size: requests a key may send at once.")
    max_concurrent_jobs: int = Field(8, description="Queued plus running jobs per key; 0: unlimited.")
    job_quota_retry_after_s: float = Field(5.0, description="Retry-After of a 429 for a full job quota.")
    auth_fallback_ttl_s: float = Field(
        600.0,
        description="MongoDB down: a key's last good lookup (kept in Redis) still admits it this long, "
        "never past its expiry; 0: off.",
    )
    token_rate_per_s: float = Field(
        2000.0,
        description="Work budget per key: estimated model tokens per second of cache misses (token bucket); "
        "0: unlimited.",
    )
    token_burst: int = Field(
        65_536,
        description="Work bucket size: one maximum request (256 texts x 256 tokens). A request costing more "
        "than the bucket is admitted when it is full.",
    )
    max_inflight_tokens: int = Field(
        512, description="Estimated tokens a key may have at the model at once, across gateways; 0: unlimited."
    )
    model_call_max_tokens: int = Field(
        512, description="A metered request's cache misses go to the model in calls of at most this many tokens."
    )
    inflight_wait_s: float = Field(
        10.0, description="How long a request waits for its key's in-flight allowance before a 429."
    )

    # Traces (serve_app/tracing.py): off unless an OTLP endpoint is set.
    otel_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector (http://collector:4318, or a full .../v1/traces URL) that gets spans of "
        "requests, cache lookups, model calls and job steps; unset: no tracing, at no cost.",
    )
    otel_sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of new traces kept (a request's incoming sampled flag wins)."
    )
    otel_headers: SecretStr | None = Field(
        None, description="Headers for the collector, name=value,... (an API key): secret, never logged."
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def weights_cache_dir(self) -> Path:
        return self.model_cache_dir or self.state_dir / "model-cache"

    @property
    def weights_cache_max_bytes(self) -> int | None:
        return int(self.model_cache_max_gb * 1e9) or None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def job_dead_letter_queue(self) -> str:
        return f"{self.job_queue}.dead"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def job_retry_queue(self) -> str:
        return f"{self.job_queue}.retry"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    def redis_options(self) -> dict[str, Any]:
        """Keyword arguments for a redis client (the URL gives host, port and database)."""
        return {"password": self.redis_password.get_secret_value()} if self.redis_password else {}

    def mongo_options(self) -> dict[str, Any]:
        """Keyword arguments for a pymongo client (the URL gives the hosts and options)."""
        if self.mongo_password is None:
            return {}
        return {
            "username": self.mongo_username,
            "password": self.mongo_password.get_secret_value(),
            "authSource": self.mongo_auth_source,
        }

    def rabbitmq_credentials(self) -> tuple[str, str] | None:
        """(user, password) for RabbitMQ, when set apart from the URL."""
        if self.rabbitmq_password is None:
            return None
        return self.rabbitmq_username, self.rabbitmq_password.get_secret_value()


S = TypeVar("S", bound=Settings)


def load_settings(cls: type[S] = Settings) -> S:  # type: ignore[assignment]
    """Settings from the environment, then from the files under <state_dir>/secrets/ where they exist."""
    secrets = cls().secrets_dir
    return cls(_secrets_dir=secrets) if secrets.is_dir() else cls()


@lru_cache
def get_settings() -> Settings:
    return load_settings()
