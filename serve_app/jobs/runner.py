"""What a job worker does with one delivery of one job.

Idempotent by job id: a job already ended is acknowledged without work; results are written
under the job's id, so a redelivered job overwrites its own result and never adds another.
Work goes to the model in chunks through the same embedding service as synchronous requests
(cache reuse, the model's batching), with progress recorded and cancellation checked as chunks finish
(at most every PROGRESS_INTERVAL_S).

Traced (serve_app/tracing.py, when on): a "job" span per delivery, in a trace of its own (the job document
does not carry the submitting request's trace; both carry job.id and the request id, request.id), with a span
per step: claim, read input, embed chunk (the cache lookups and model calls under each), write result, settle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import numpy as np
from pymongo.errors import PyMongoError

from serve_app import metrics, tracing
from serve_app.embeddings.service import EmbeddingOutcome, EmbeddingService
from serve_app.errors import APIError
from serve_app.jobs.objects import InputError, JobObjects, ObjectRef, parse_text_lines
from serve_app.jobs.queue import Disposition
from serve_app.jobs.store import CancelRequested, JobEnded, JobMissing, JobStatus, JobStore, LeaseHeld
from serve_app.rerank.service import RerankService
from serve_app.settings import Settings

logger = logging.getLogger("ray.serve")  # the replica's log (JSON, with the request id)

PROGRESS_INTERVAL_S = 0.5


class JobCancelled(Exception):
    """The job was cancelled while running."""


class LeaseLost(Exception):
    """This delivery's lease lapsed and another delivery has the job now."""


@dataclass(frozen=True)
class Settlement:
    disposition: Disposition
    delay_s: float = 0.0


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        embeddings: EmbeddingService,
        objects: JobObjects,
        rerank: RerankService | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.embeddings = embeddings
        self._rerank = rerank
        self.objects = objects
        self.worker = {"host": socket.gethostname(), "pid": os.getpid()}
        tracing.configure(settings, "job-worker")  # once per process; off without INFER_OTEL_ENDPOINT

    def reranker(self) -> RerankService:
        """The rerank service, over the embeddings' catalog and cache unless one was given."""
        if self._rerank is None:
            self._rerank = RerankService(
                self.embeddings.catalog, self.embeddings.cache, call_max_tokens=self.embeddings.call_max_tokens
            )
        return self._rerank

    async def run(self, job_id: str) -> Settlement:
        """Claim the job, compute it, store its result, end it: one forward path, each step one write."""
        with tracing.span("job", {"job.id": job_id}) as span:
            settlement = await self._run(job_id, span)
            span.set_attribute("job.disposition", settlement.disposition.value)
            return settlement

    async def _run(self, job_id: str, span: tracing.Span) -> Settlement:
        lease = uuid.uuid4().hex
        try:
            # A job not claimed (ended, cancelled, held elsewhere) is an outcome, not a failure of the step.
            with tracing.span("claim", {"job.id": job_id}, set_status_on_exception=False):
                job = await self.store.claim(job_id, self.worker, lease)
        except JobMissing:
            logger.error("message for unknown job %s dead-lettered", job_id, extra={"job": job_id})
            return Settlement(Disposition.DEAD)
        except JobEnded:
            return Settlement(Disposition.ACK)  # a redelivery of a job already ended
        except CancelRequested:
            await self._finish(job_id, JobStatus.CANCELLED)
            return Settlement(Disposition.ACK)
        except LeaseHeld as held:
            # Another delivery is working on it (a redelivery after a connection loss): look again later.
            return Settlement(Disposition.RETRY, held.remaining_s + 0.5)
        span.set_attribute("job.attempt", job["attempts"])
        span.set_attribute("job.model", job["model"])
        if job.get("request_id"):  # the submitting request's id: its request span has it as request.id too
            span.set_attribute(tracing.REQUEST_ID_ATTRIBUTE, job["request_id"])
        if job["attempts"] > self.settings.job_max_attempts:
            return await self._give_up(job)
        try:
            with tracing.span("read input", {"job.id": job_id, "job.input": job["input"]["kind"]}) as step:
                texts = await self._texts(job)
                step.set_attribute("texts", len(texts))
            query = job["input"].get("query")
            vectors, tokens, version = await self._embed(job_id, lease, job["model"], texts, query)
            with tracing.span("write result", {"job.id": job_id, "texts": len(tokens)}):
                result = await self._store_result(
                    job_id, vectors, tokens, version, "embed" if query is None else "rerank"
                )
        except JobCancelled:
            await self._finish(job_id, JobStatus.CANCELLED, lease_owner=lease)
            return Settlement(Disposition.ACK)
        except LeaseLost:
            return Settlement(Disposition.ACK)  # the job is in the hands of the delivery that took it
        except (InputError, APIError) as exc:
            # The job itself is wrong (bad input, a model no longer served): no retry helps.
            if isinstance(exc, APIError) and exc.status_code >= 500:
                return await self._retry_later(job, lease, exc)
            await self._finish(
                job_id, JobStatus.FAILED, lease_owner=lease, error={"type": "invalid_input", "message": str(exc)}
            )
            logger.warning("job %s failed: invalid input: %s", job_id, exc, extra={"job": job_id})
            return Settlement(Disposition.ACK)
        except Exception as exc:  # anything else may pass: retry, within the bound
            return await self._retry_later(job, lease, exc)
        await self._finish(job_id, JobStatus.SUCCEEDED, lease_owner=lease, result=result)
        return Settlement(Disposition.ACK)

    async def _finish(self, job_id: str, status: JobStatus, **fields) -> None:
        """The job's end, written: the "settle" step of its trace."""
        with tracing.span("settle", {"job.id": job_id, "job.status": status.value}):
            await self.store.finish(job_id, status, **fields)

    async def _retry_later(self, job: dict, lease: str, exc: Exception) -> Settlement:
        message = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "job %s attempt %d failed: %s",
            job["_id"],
            job["attempts"],
            message,
            extra={"job": job["_id"], "job_event": "attempt_failed", "attempt": job["attempts"]},
        )
        if isinstance(exc, PyMongoError):
            metrics.dependency_error("mongodb")
        with tracing.span("settle", {"job.id": job["_id"], "job.status": "retry"}):
            await self.store.release(job["_id"], lease, message)
        if job["attempts"] >= self.settings.job_max_attempts:
            return await self._give_up({**job, "last_error": message})
        metrics.job("retried")  # a failed attempt tried again (a delivery deferred behind another's lease is not)
        return Settlement(Disposition.RETRY, self.settings.job_retry_delay_s * 2 ** (job["attempts"] - 1))

    async def _give_up(self, job: dict) -> Settlement:
        attempts = self.settings.job_max_attempts
        reason = f"gave up after {attempts} attempts; last error: {job.get('last_error') or 'the worker stopped'}"
        await self._finish(job["_id"], JobStatus.FAILED, error={"type": "attempts_exhausted", "message": reason})
        logger.error("job %s failed and is dead-lettered: %s", job["_id"], reason, extra={"job": job["_id"]})
        return Settlement(Disposition.DEAD)

    async def _texts(self, job: dict) -> list[str]:
        source = job["input"]
        if source["kind"] == "inline":
            texts = await self.store.inline_texts(job["_id"])
            if texts is None:
                raise InputError("the job's inline input is missing")
            return texts
        ref = ObjectRef.parse(source["url"])
        await asyncio.to_thread(self.objects.check_input, ref)
        return await asyncio.to_thread(
            lambda: parse_text_lines(
                # A JSON-escaped text of max_text_chars characters fits in 12 bytes a character.
                self.objects.read_lines(ref, max_line_bytes=12 * self.settings.max_text_chars + 64),
                max_items=self.settings.job_max_items,
                max_chars=self.settings.max_text_chars,
            )
        )

    async def _embed(
        self, job_id: str, lease: str, model: str, texts: list[str], query: str | None = None
    ) -> tuple[np.ndarray, list[int], str]:
        """Chunks to the model with a sliding window of `job_parallel_chunks` in flight, so the
        model never waits on this job; progress (and the cancel check) at most every half second.
        With a query (a rerank job) each text is a document and its "vector" is its one score."""
        # One version answers the whole job: drawn once (a canary's share too), named in every chunk.
        client = await self.embeddings.model(model, "embed" if query is None else "rerank")
        model = f"{client.name}:{(await client.info()).version}"
        size = self.settings.job_chunk_size
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        window = asyncio.Semaphore(self.settings.job_parallel_chunks)
        done = 0
        last_report = time.monotonic()
        cancelled = False
        await self._progress(job_id, lease, 0, len(texts))

        async def one(index: int, chunk: list[str]) -> EmbeddingOutcome:
            nonlocal done, last_report, cancelled
            async with window:
                if cancelled:
                    raise JobCancelled
                with tracing.span("embed chunk", {"job.id": job_id, "chunk": index, "texts": len(chunk)}):
                    if query is None:
                        outcome = await self.embeddings.embed(model, chunk)
                    else:
                        scored = await self.reranker().rerank(model, query, chunk)
                        outcome = EmbeddingOutcome(
                            scored.model, scored.version, scored.scores[:, None], scored.token_counts, scored.cache_hits
                        )
                done += len(chunk)
                if time.monotonic() - last_report >= PROGRESS_INTERVAL_S:
                    last_report = time.monotonic()
                    if await self.store.cancel_requested(job_id):
                        cancelled = True
                        raise JobCancelled
                    await self._progress(job_id, lease, done, len(texts))
                return outcome

        tasks = [asyncio.ensure_future(one(index, chunk)) for index, chunk in enumerate(chunks)]
        try:
            outcomes = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        await self._progress(job_id, lease, len(texts), len(texts))
        versions = {outcome.version for outcome in outcomes}
        if len(versions) > 1:
            raise RuntimeError(f"the model changed version during the job ({sorted(versions)}); retrying")
        tokens = [n for outcome in outcomes for n in outcome.token_counts]
        return np.concatenate([outcome.vectors for outcome in outcomes]), tokens, versions.pop()

    async def _progress(self, job_id: str, lease: str, done: int, total: int) -> None:
        if not await self.store.record_progress(job_id, lease, done, total):
            raise LeaseLost

    async def _store_result(
        self, job_id: str, vectors: np.ndarray, tokens: list[int], version: str, task: str = "embed"
    ) -> dict:
        result = {
            "task": task,
            "count": len(tokens),
            "dims": int(vectors.shape[1]),
            "version": version,
            "prompt_tokens": int(sum(tokens)),
        }
        if len(tokens) <= self.settings.job_inline_result_max_items:
            await self.store.save_inline_result(job_id, version, vectors, tokens)
            return {**result, "kind": "inline"}
        ref, size = await asyncio.to_thread(self.objects.write_result, job_id, vectors, tokens, task)
        return {**result, "kind": "object", "url": ref.url, "bytes": size}
