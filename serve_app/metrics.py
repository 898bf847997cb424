"""The product's own metrics, through Ray's metrics API (ray.util.metrics), which Prometheus scrapes.

Every metric is made once per process, on first use, with bounded label sets: routes are FastAPI's
route templates (one unknown path is "other"), models are names the catalog knows (anything else is
"other"), reasons, limiters, services and job states are the closed lists below. Ray exports each
with a `ray_` prefix, counters with a `_total` suffix (`ray_inference_requests_total`), and adds its
own labels (application, deployment, replica, node). cluster/monitoring/grafana/ and the alert rules
name these series; tests/integration/infra/test_dashboards.py checks Prometheus holds them.

The closed label sets are counted from zero at start (Prometheus's advice: a rate over a counter that
has never been incremented is "no data", not 0), so a dashboard shows "no refusals" as 0.

Outside a Ray worker (unit tests, the CLIs) Ray's metrics are inert; `recorded()` keeps what this
process recorded so unit tests can check what the code counts without Ray.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from collections.abc import Iterable

from ray.serve import metrics as ray_metrics  # ray.util.metrics plus Serve's deployment/replica labels

logger = logging.getLogger(__name__)

OTHER = "other"
AUTH_REASONS = ("missing", "malformed", "unknown_key", "revoked", "expired", "invalid_session", "other")
LIMITERS = ("requests", "tokens", "inflight", "jobs", "other")
SERVICES = ("redis", "mongodb", "rabbitmq", "s3", "model")
JOB_STATES = ("accepted", "running", "succeeded", "failed", "cancelled", "retried", "dead_lettered")
SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
JOB_SECONDS = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]


class _Metrics:
    """The metrics of one process."""

    def __init__(self) -> None:
        counter, histogram = ray_metrics.Counter, ray_metrics.Histogram
        self.requests = counter(
            "inference_requests",
            description="HTTP requests answered by the gateway, by route template, model and status code.",
            tag_keys=("route", "model", "status"),
        )
        self.cache_lookups = counter(
            "embedding_cache_lookups",
            description="Result-cache lookups of texts, by model and result (hit or miss).",
            tag_keys=("model", "result"),
        )
        self.auth_refusals = counter(
            "auth_refusals", description="Requests refused authentication (401), by reason.", tag_keys=("reason",)
        )
        self.rate_limited = counter(
            "rate_limited",
            description="Requests refused with a 429, by the limiter that refused.",
            tag_keys=("limiter",),
        )
        self.dependency_errors = counter(
            "dependency_errors",
            description="Calls to a dependency that failed (timeout, connection, refused), by service.",
            tag_keys=("service",),
        )
        self.history_dropped = counter(
            "history_records_dropped", description="Request-history records dropped (buffer full or MongoDB refused)."
        )
        self.jobs = counter("jobs", description="Jobs entering each state.", tag_keys=("state",))
        self.job_duration = histogram(
            "job_duration_seconds",
            description="From a job's first claim to its end, by final state.",
            boundaries=JOB_SECONDS,
            tag_keys=("state",),
        )
        self.texts = counter(
            "embedding_texts_computed", description="Texts embedded by the model.", tag_keys=("model",)
        )
        self.tokens = counter(
            "embedding_tokens_computed", description="Tokens of the texts embedded by the model.", tag_keys=("model",)
        )
        self.batch_texts = histogram(
            "embedding_batch_texts",
            description="Texts per model batch (all requests in the batch).",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            tag_keys=("model",),
        )
        self.batch_tokens = histogram(
            "embedding_batch_tokens",
            description="Tokens per model batch (the tokenizer's counts, all requests in the batch).",
            boundaries=[16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384],
            tag_keys=("model",),
        )
        self.queue_wait = histogram(
            "embedding_queue_wait_seconds",
            description="How long a request queued at the model replica before its batch ran, by lane.",
            boundaries=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
            tag_keys=("model", "lane"),
        )
        self.forward = histogram(
            "embedding_forward_seconds",
            description="Time of one model batch's forward pass (tokenize, run, pool).",
            boundaries=SECONDS,
            tag_keys=("model",),
        )
        self.download_bytes = counter(
            "weights_download_bytes",
            description="Bytes of weights downloaded from the object store.",
            tag_keys=("model",),
        )
        self.download_seconds = histogram(
            "weights_download_seconds",
            description="Time to make one version's weights ready on the node: download, verify (cached: ms).",
            boundaries=[0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
            tag_keys=("model",),
        )
        for reason in AUTH_REASONS:
            _zero(self.auth_refusals, {"reason": reason})
        for limiter in LIMITERS:
            _zero(self.rate_limited, {"limiter": limiter})
        for service in SERVICES:
            _zero(self.dependency_errors, {"service": service})
        for state in JOB_STATES:
            _zero(self.jobs, {"state": state})
        _zero(self.history_dropped, {})


def _zero(counter: ray_metrics.Counter, tags: dict[str, str]) -> None:
    """Export the series at 0: Ray's Counter.inc refuses 0, its record path does not."""
    try:
        counter._record(0, tags=tags)
    except Exception as exc:  # a Ray without that path: the series appears at its first event instead
        logger.debug("cannot export %s at zero: %r", counter._name, exc)


_lock = threading.Lock()
_metrics: _Metrics | None = None
_recorded: Tally[tuple] = Tally()


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def _inc(name: str, tags: dict[str, str], value: float = 1.0) -> None:
    if value <= 0:
        return
    getattr(_get(), name).inc(value, tags=tags)
    _recorded[(name, *sorted(tags.items()))] += value


def _observe(name: str, value: float, tags: dict[str, str]) -> None:
    getattr(_get(), name).observe(value, tags=tags)
    _recorded[(name, *sorted(tags.items()))] += 1


def recorded(name: str, **tags: str) -> float:
    """What this process counted for a metric and label set (observations, for histograms): for tests."""
    return _recorded[(name, *sorted(tags.items()))]


def start() -> None:
    """Make the metrics now (at a replica's start), so their zero series are exported from the start."""
    _get()


def known(value: str | None, allowed: Iterable[str]) -> str:
    return value if value is not None and value in allowed else OTHER


# -- what the code records ------------------------------------------------------------------------


def request(route: str, model: str, status: int) -> None:
    _inc("requests", {"route": route, "model": model, "status": str(status)})


def cache_lookups(model: str, hits: int, misses: int) -> None:
    _inc("cache_lookups", {"model": model, "result": "hit"}, hits)
    _inc("cache_lookups", {"model": model, "result": "miss"}, misses)


def auth_refused(reason: str) -> None:
    _inc("auth_refusals", {"reason": known(reason, AUTH_REASONS)})


def rate_limited(limiter: str) -> None:
    _inc("rate_limited", {"limiter": known(limiter, LIMITERS)})


def dependency_error(service: str) -> None:
    _inc("dependency_errors", {"service": known(service, SERVICES)})


def history_dropped(count: int = 1) -> None:
    _inc("history_dropped", {}, count)


def job(state: str) -> None:
    _inc("jobs", {"state": known(state, JOB_STATES)})


def job_ended(state: str, duration_s: float | None) -> None:
    job(state)
    if duration_s is not None and duration_s >= 0:
        _observe("job_duration", duration_s, {"state": known(state, JOB_STATES)})


def batch_computed(model: str, tokens: int, forward_s: float) -> None:
    """A batch the model computed: its tokens and its forward pass (the pinned models and the pool)."""
    _inc("tokens", {"model": model}, tokens)
    _observe("forward", forward_s, {"model": model})


def batch_formed(model: str, texts: int, tokens: int, lane: str, waits_s: Iterable[float]) -> None:
    """A pinned model's batch: texts computed, its size in texts and tokens, each request's wait in the queue."""
    tags = {"model": model}
    _inc("texts", tags, texts)
    _observe("batch_texts", texts, tags)
    _observe("batch_tokens", tokens, tags)
    for wait in waits_s:
        _observe("queue_wait", wait, {"model": model, "lane": lane})


def weights_fetched(model: str, downloaded_bytes: int, seconds: float) -> None:
    """One fetch of a version's weights: bytes downloaded (0 when the node's cache had them) and its time."""
    if downloaded_bytes > 0:
        _inc("download_bytes", {"model": model}, downloaded_bytes)
    else:
        _zero(_get().download_bytes, {"model": model})
    _observe("download_seconds", seconds, {"model": model})
