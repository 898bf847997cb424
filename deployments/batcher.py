"""A model replica's batcher: people first, jobs when no one waits; batches bounded by texts and by tokens.

It takes the place of `@serve.batch` in the pinned model deployment and, one per model id, in the model
pool, for two things Serve's batching does not do:

- **Two lanes.** A request is `interactive` (a person waits on it: the gateway's synchronous
  routes) or `background` (a job chunk). A batch is drawn from the interactive lane whenever anything
  waits there, and from the background lane only when nothing does, so a large job soaks up idle
  capacity without queueing ahead of people. A background batch is also held to
  pass, not a long one. With `background_share` above 0, that share of the batches taken while
  both lanes wait goes to the background lane, so a load of people that never lets the interactive
  lane empty cannot starve a job; at 0 (the default) people always go first, and jobs get the
  moments the interactive lane is empty.
- **Token bounds.** Besides `max_texts`, a batch holds at most `max_tokens` tokens (the real counts
  from the model's tokenizer), so a few long texts make a small batch, not one that takes seconds.
  An entry larger than a bound still runs, alone.

Like Serve's batching with `batch_wait_timeout_s: 0` (measured best here; docs/benchmarks.md), a
request that reaches an idle replica starts at once, and a batch is made of what queued while the
previous one ran: one batch runs at a time. A caller that leaves (a cancelled request) is dropped
from the queue before its batch forms.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

logger = logging.getLogger("ray.serve")

Lane = Literal["interactive", "background"]
LANES: tuple[Lane, ...] = ("interactive", "background")  # the order batches are drawn in
R = TypeVar("R")


try:  # Serve's request context: no public accessor in Ray 2.60
    from ray.serve.context import _get_serve_request_context
except ImportError:  # a Ray that moved it: batches are logged without request ids
    _get_serve_request_context = None


def current_request_id() -> str:
    """The Serve request id of the caller (its X-Request-ID, carried across handle calls), or "".

    Serve keeps it in a context variable that it reads itself to stamp `request_id` on log lines;
    tests/integration/infra/test_request_logs.py fails if this stops working.
    """
    if _get_serve_request_context is None:
        return ""
    return _get_serve_request_context().request_id or ""


@dataclass(eq=False)
class _Entry:
    items: Sequence[object]
    tokens: int
    lane: Lane
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)
    request_id: str = field(default_factory=current_request_id)


@dataclass(frozen=True)
class BatchFormed:
    """What the batcher tells `on_batch` about each batch it ran (metrics and the replica's log line)."""

    lane: Lane
    requests: int
    items: int
    tokens: int
    waits_s: list[float]  # how long each request queued
    request_ids: list[str]  # each request's Serve request id (X-Request-ID), "" where none
    forward_s: float = 0.0  # the run itself (the forward pass)
    ok: bool = True  # False: the run raised (each request got the error)


def log_batch(model: str, batch: BatchFormed) -> None:
    """The replica's one line per batch (JSON with the log config): size, tokens, waits, forward time, and
    every request id in it, so one request's batch is found by its X-Request-ID."""
    logger.info(
        "batch of %d texts (%d tokens, %d requests) for %s in %.1f ms%s",
        batch.items,
        batch.tokens,
        batch.requests,
        model,
        batch.forward_s * 1000,
        "" if batch.ok else ", failed",
        extra={
            # The batch runs outside any request's context; a batch of one request's texts is that request's.
            **({"request_id": batch.request_ids[0]} if len(batch.request_ids) == 1 and batch.request_ids[0] else {}),
            "model": model,
            "lane": batch.lane,
            "batch_texts": batch.items,
            "batch_tokens": batch.tokens,
            "batch_requests": ",".join(batch.request_ids),
            "forward_ms": round(batch.forward_s * 1000, 3),
            "max_wait_ms": round(max(batch.waits_s, default=0.0) * 1000, 3),
            "ok": batch.ok,
        },
    )


class PriorityBatcher(Generic[R]):
    """Runs `run(requests)` (one result per request, in order) over batches of queued requests."""

    def __init__(
        self,
        run: Callable[[list[Sequence[object]]], Awaitable[list[R]]],
        *,
        max_texts: int = 64,
        max_tokens: int = 2048,
        background_max_texts: int = 16,
        background_share: float = 0.0,
        wait_s: float = 0.0,
        on_batch: Callable[[BatchFormed], None] | None = None,
    ) -> None:
        self._run = run
        self._on_batch = on_batch
        self.configure(
            max_texts=max_texts,
            max_tokens=max_tokens,
            background_max_texts=background_max_texts,
            background_share=background_share,
            wait_s=wait_s,
        )
        self._credit = 0.0  # the background lane's share earned while both lanes waited (at most one batch)
        self._queues: dict[Lane, deque[_Entry]] = {lane: deque() for lane in LANES}
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._running = False  # a batch is at the model now

    def configure(
        self,
        *,
        max_texts: int,
        max_tokens: int,
        background_max_texts: int,
        wait_s: float,
        background_share: float = 0.0,
    ) -> None:
        """New bounds, applied from the next batch on."""
        if min(max_texts, max_tokens, background_max_texts) < 1 or wait_s < 0:
            raise ValueError("batch bounds are at least 1, and the wait is not negative")
        if not 0 <= background_share <= 1:
            raise ValueError("background_share is a share: between 0 and 1")
        self.background_share = background_share
        self.max_texts = max_texts
        self.max_tokens = max_tokens
        self.background_max_texts = background_max_texts
        self.wait_s = wait_s

    def limits(self, lane: Lane) -> tuple[int, int]:
        """(texts, tokens) a batch of this lane holds at most."""
        texts = self.max_texts if lane == "interactive" else min(self.max_texts, self.background_max_texts)
        return texts, self.max_tokens

    async def submit(self, items: Sequence[object], tokens: int, lane: Lane = "interactive") -> R:
        """The result of `items` (one request) once a batch has run it."""
        if lane not in LANES:
            raise ValueError(f"lane {lane!r} is not one of {LANES}")
        loop = asyncio.get_running_loop()
        entry = _Entry(items=items, tokens=tokens, lane=lane, future=loop.create_future())
        self._queues[lane].append(entry)
        self._ensure_worker(loop)
        assert self._wake is not None
        self._wake.set()
        return await entry.future  # a caller cancelled here cancels the future: its entry is skipped

    async def submit_items(
        self, items: Sequence[object], count_tokens: Callable[[Sequence[object]], list[int]], lane: Lane
    ) -> list[R]:
        """One request's items in parts that each fit its lane's batch (texts and tokens, the model's own counts),
        submitted together: each part's result, in order."""
        from serve_app.embeddings.service import split_by_tokens

        # Tokenizing a few texts takes well under a millisecond; a long list goes off the event loop.
        tokens = count_tokens(items) if len(items) <= 32 else await asyncio.to_thread(count_tokens, items)
        max_texts, max_tokens = self.limits(lane)
        parts = split_by_tokens(list(items), tokens, max_tokens, max_texts)
        return list(await asyncio.gather(*(self.submit(part, n, lane) for part, n in parts)))

    def idle(self) -> bool:
        """Nothing queued, and no batch at the model."""
        return not self._running and not any(self._live(lane) for lane in LANES)

    def close(self) -> None:
        """Stop the worker (an idle batcher no longer needed: its model was dropped). A later submit starts one."""
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is not None and not self._worker.done() and self._worker.get_loop() is loop:
            return
        if self._worker is not None and self._worker.done() and not self._worker.cancelled():
            logger.error("the batcher's worker had stopped (%r); starting it again", self._worker.exception())
        self._wake = asyncio.Event()
        # A context of its own: made from the first caller's, it would carry that request's id (Serve's request
        # context) into every later batch's log lines.
        self._worker = loop.create_task(self._work(), name="priority-batcher", context=contextvars.Context())

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            batch = self._take()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._running = True  # from here until its callers are answered: not idle, so not closed
            try:
                await self._run_batch(batch)
            finally:
                self._running = False

    def _take(self) -> list[_Entry]:
        """The next batch: interactive entries first (background ones when its share is due and both wait),
        its lane's entries in order while they fit."""
        waiting = [lane for lane in LANES if self._live(lane)]
        if not waiting:
            return []
        lane = waiting[0]
        if len(waiting) == 2:
            # Earned per contested batch and capped at one batch, so time with the share at 0 (or with one
            # lane empty) builds no debt that would later hand the jobs a run of batches.
            self._credit = min(1.0, self._credit + self.background_share)
            if self._credit >= 1.0:
                lane = "background"
                self._credit -= 1.0
        return self._fill([self._queues[lane].popleft()])

    def _live(self, lane: Lane) -> bool:
        """Whether a caller still waits in this lane (entries whose callers left are dropped)."""
        queue = self._queues[lane]
        while queue and queue[0].future.done():
            queue.popleft()
        return bool(queue)

    def _report(self, batch: list[_Entry], formed: float, ran_s: float, *, ok: bool) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(
                BatchFormed(
                    lane=batch[0].lane,
                    requests=len(batch),
                    items=sum(len(entry.items) for entry in batch),
                    tokens=sum(entry.tokens for entry in batch),
                    waits_s=[formed - entry.queued_at for entry in batch],
                    request_ids=[entry.request_id for entry in batch],
                    forward_s=ran_s,
                    ok=ok,
                )
            )
        except Exception:  # metrics never fail a batch
            logger.exception("recording a batch failed")

    async def _run_batch(self, batch: list[_Entry]) -> None:
        if self.wait_s > 0:  # an idle wait for more to queue (measured slower here; kept for other machines)
            try:
                await asyncio.sleep(self.wait_s)
            except BaseException:
                for entry in batch:
                    entry.future.cancel()
                raise
            batch = self._fill(batch)
        batch = [entry for entry in batch if not entry.future.done()]
        if not batch:
            return
        formed = time.monotonic()
        try:
            results = await self._run([entry.items for entry in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} requests returned {len(results)} results")
        except Exception as exc:
            ran_s = time.monotonic() - formed
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            self._report(batch, formed, ran_s, ok=False)
            return
        except BaseException:  # the worker itself is cancelled (the replica stops): nobody waits forever
            for entry in batch:
                entry.future.cancel()
            raise
        ran_s = time.monotonic() - formed
        for entry, result in zip(batch, results, strict=True):
            if not entry.future.done():
                entry.future.set_result(result)
        self._report(batch, formed, ran_s, ok=True)  # after the answers: nobody waits on the metrics

    def _fill(self, batch: list[_Entry]) -> list[_Entry]:
        """More of the batch's lane, in order, while it fits its bounds."""
        max_texts, max_tokens = self.limits(batch[0].lane)
        texts = sum(len(entry.items) for entry in batch)
        tokens = sum(entry.tokens for entry in batch)
        queue = self._queues[batch[0].lane]
        while queue:
            entry = queue[0]
            if entry.future.done():
                queue.popleft()
                continue
            if texts + len(entry.items) > max_texts or tokens + entry.tokens > max_tokens:
                break
            batch.append(queue.popleft())
            texts += len(entry.items)
            tokens += entry.tokens
        return batch
