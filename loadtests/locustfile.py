"""Locust load test of the cluster through NGINX: the real traffic mix.

    locust -f loadtests/locustfile.py                     # web UI on :8089
    make loadtest                                         # headless, CSV + HTML under loadtests/results/

Options (also as LOCUST_* environment variables):
    --texts-per-request N   texts per synchronous request (default 8)
    --text-words N          words per generated text (default 12)
    --zipf-pool N           distinct texts the repeated users draw from (default 2000)
    --zipf-s S              Zipf exponent of that draw; higher repeats more (default 1.1)
    --job-texts N           texts per asynchronous job (default 200)
    --fresh-weight/--repeated-weight/--jobs-weight   the mix (default 4/4/1)
    --api-key KEY           sent as a Bearer token (default: the key `make up` wrote to .cluster/api-key)
"""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid
from pathlib import Path

import numpy as np
from locust import HttpUser, between, events, task
from locust.exception import RescheduleTask

from loadtests.texts import WORDS

MODEL = "all-minilm-l6-v2"


def _dev_key() -> str:
    """The key `make up` wrote, if this runs where the cluster was brought up."""
    path = Path(os.environ.get("INFER_STATE_DIR", Path(__file__).resolve().parents[1] / ".cluster")) / "api-key"
    return path.read_text().strip() if path.exists() else ""


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--texts-per-request", type=int, default=8, env_var="LOCUST_TEXTS_PER_REQUEST")
    parser.add_argument("--text-words", type=int, default=12, env_var="LOCUST_TEXT_WORDS")
    parser.add_argument("--zipf-pool", type=int, default=2000, env_var="LOCUST_ZIPF_POOL")
    parser.add_argument("--zipf-s", type=float, default=1.1, env_var="LOCUST_ZIPF_S")
    parser.add_argument("--job-texts", type=int, default=200, env_var="LOCUST_JOB_TEXTS")
    parser.add_argument("--fresh-weight", type=int, default=4, env_var="LOCUST_FRESH_WEIGHT")
    parser.add_argument("--repeated-weight", type=int, default=4, env_var="LOCUST_REPEATED_WEIGHT")
    parser.add_argument("--jobs-weight", type=int, default=1, env_var="LOCUST_JOBS_WEIGHT")
    parser.add_argument("--api-key", default=_dev_key(), env_var="LOCUST_API_KEY", is_secret=True)


@events.init.add_listener
def _apply_weights(environment, **_) -> None:
    options = environment.parsed_options
    if options is not None:
        FreshEmbeddingsUser.weight = options.fresh_weight
        RepeatedEmbeddingsUser.weight = options.repeated_weight
        JobUser.weight = options.jobs_weight


def fresh_text(words: int, rng: random.Random) -> str:
    """A text nobody has sent before: a cache miss."""
    return f"{uuid.uuid4().hex[:8]} " + " ".join(rng.choices(WORDS, k=words))


class ZipfTexts:
    """Texts drawn from a fixed pool with Zipf-like frequencies: a few are very common."""

    def __init__(self, pool: int, s: float, words: int, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.texts = [f"pool-{i} " + " ".join(rng.choices(WORDS, k=words)) for i in range(pool)]
        weights = 1.0 / np.arange(1, pool + 1) ** s
        self.cumulative = np.cumsum(weights / weights.sum())

    def draw(self, k: int, rng: random.Random) -> list[str]:
        picks = np.searchsorted(self.cumulative, [rng.random() for _ in range(k)])
        return [self.texts[min(i, len(self.texts) - 1)] for i in picks]


class _ApiUser(HttpUser):
    abstract = True
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.rng = random.Random()
        if options.api_key:
            self.client.headers["Authorization"] = f"Bearer {options.api_key}"

    def embed(self, texts: list[str], name: str) -> None:
        with self.client.post(
            "/v1/embeddings", json={"model": MODEL, "input": texts}, name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif len(response.json()["data"]) != len(texts):
                response.failure("wrong number of embeddings")


class FreshEmbeddingsUser(_ApiUser):
    """Synchronous embeddings of texts never seen before (every item computed)."""

    weight = 4

    @task
    def fresh(self) -> None:
        texts = [fresh_text(self.options.text_words, self.rng) for _ in range(self.options.texts_per_request)]
        self.embed(texts, "POST /v1/embeddings [fresh]")


class RepeatedEmbeddingsUser(_ApiUser):
    """Synchronous embeddings of texts drawn from a skewed pool (mostly cache hits once warm)."""

    weight = 4
    _pool: ZipfTexts | None = None

    def on_start(self) -> None:
        super().on_start()
        if RepeatedEmbeddingsUser._pool is None:
            o = self.options
            RepeatedEmbeddingsUser._pool = ZipfTexts(o.zipf_pool, o.zipf_s, o.text_words)

    @task
    def repeated(self) -> None:
        assert self._pool is not None
        self.embed(self._pool.draw(self.options.texts_per_request, self.rng), "POST /v1/embeddings [repeated]")


class JobUser(_ApiUser):
    """An asynchronous job: submit, poll until it ends, fetch the result."""

    weight = 1
    wait_time = between(0.5, 1.5)

    @task
    def job(self) -> None:
        texts = [fresh_text(self.options.text_words, self.rng) for _ in range(self.options.job_texts)]
        submitted = self.client.post("/v1/jobs", json={"model": MODEL, "input": texts}, name="POST /v1/jobs")
        if submitted.status_code != 202:
            raise RescheduleTask()
        job_id = submitted.json()["id"]
        started = time.perf_counter()
        for delay in itertools.chain([0.1, 0.2, 0.3], itertools.repeat(0.5)):
            status = self.client.get(f"/v1/jobs/{job_id}", name="GET /v1/jobs/{id}").json().get("status")
            if status in ("succeeded", "failed", "cancelled") or time.perf_counter() - started > 300:
                break
            time.sleep(delay)
        events.request.fire(
            request_type="JOB",
            name=f"job of {len(texts)} texts [{status}]",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=None if status == "succeeded" else RuntimeError(f"job ended {status}"),
            context={},
        )
        if status == "succeeded":
            self.client.get(f"/v1/jobs/{job_id}/result", name="GET /v1/jobs/{id}/result")
