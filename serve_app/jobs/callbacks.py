"""Callback delivery in a job worker: concurrent, bounded, and fair between tenants.

One loop claims due callbacks (MongoDB) and runs each delivery as its own task. A replica has at
most `callback_concurrency` deliveries in flight, at most `callback_per_destination` of them to
one host:port and at most `callback_per_tenant` for one tenant. A callback whose destination or
tenant is at its bound is not claimed (the claim query skips them), so it takes no slot, keeps
its place in line, and stays due for another replica. A receiver that never answers therefore
holds only its own destination's slots, and only for `callback_timeout_s` per attempt.

Every callback is signed with its tenant's current secret (read at delivery, cached briefly).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from serve_app.errors import NotFoundError
from serve_app.jobs.store import JobStore, public_view
from serve_app.outbound import CALLBACK_ID_HEADER, SIGNATURE_HEADER, Delivery, Outbound, destination, sign
from serve_app.settings import Settings

logger = logging.getLogger("ray.serve")

POLL_S = 0.25  # how long the loop waits when nothing it may take is due (or a slot frees sooner)
SECRET_CACHE_S = 5.0  # a rotated secret signs deliveries at most this much later
ERROR_PAUSE_S = 1.0


class SecretCache:
    """Tenants' callback secrets, each read at most every `ttl_s` (None: the tenant has none)."""

    def __init__(self, fetch: Callable[[str], Awaitable[str | None]], ttl_s: float = SECRET_CACHE_S) -> None:
        self.fetch = fetch
        self.ttl_s = ttl_s
        self.entries: dict[str, tuple[float, str | None]] = {}

    async def get(self, owner: str) -> str | None:
        entry = self.entries.get(owner)
        if entry is not None and time.monotonic() - entry[0] < self.ttl_s:
            return entry[1]
        secret = await self.fetch(owner)
        if len(self.entries) > 10_000:
            self.entries.clear()
        self.entries[owner] = (time.monotonic(), secret)
        return secret


class CallbackDispatcher:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        secrets: SecretCache,
        outbound: Outbound,
        *,
        poll_s: float = POLL_S,
    ) -> None:
        self.settings = settings
        self.store = store
        self.secrets = secrets
        self.outbound = outbound
        self.poll_s = poll_s
        self.concurrency = max(1, settings.callback_concurrency)
        self.per_destination = max(1, settings.callback_per_destination)
        self.per_tenant = max(1, settings.callback_per_tenant)
        # Longer than one attempt can take (the outbound client's whole-attempt timeout), so a
        # claim lapses only when its worker died; a worker that lives records or releases it.
        self.lease_s = settings.callback_timeout_s * 2 + 5
        self.tasks: set[asyncio.Task] = set()
        self.by_destination: Counter[str] = Counter()
        self.by_owner: Counter[str] = Counter()
        self.freed = asyncio.Event()

    # -- the claim loop ---------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                if not await self.step():
                    await self._wait_for_slot(self.poll_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop outlives any one failure (MongoDB down, say)
                logger.warning("callback claim failed: %s", type(exc).__name__)
                await asyncio.sleep(ERROR_PAUSE_S)

    async def step(self) -> bool:
        """Claim and start one delivery; False when there is nothing this replica may take now."""
        if len(self.tasks) >= self.concurrency:
            return False
        job = await self.store.claim_due_callback(
            self.lease_s,
            skip_destinations=self._full(self.by_destination, self.per_destination),
            skip_owners=self._full(self.by_owner, self.per_tenant),
        )
        if job is None:
            return False
        callback = job["callback"]
        dest = callback.get("destination") or destination(callback["url"])
        owner = job.get("owner") or ""
        if self.by_destination[dest] >= self.per_destination or self.by_owner[owner] >= self.per_tenant:
            # A document from before destinations were stored, which the query could not skip:
            # give it back (due again shortly, with its destination, so it is skipped from now on).
            await self.store.release_callback(job["_id"], delay_s=self.poll_s, destination=dest)
            return True
        self.by_destination[dest] += 1
        self.by_owner[owner] += 1
        task = asyncio.get_running_loop().create_task(self._run_one(job, dest, owner), name=f"callback-{job['_id']}")
        self.tasks.add(task)
        return True

    @staticmethod
    def _full(counts: Counter[str], bound: int) -> list[str]:
        return [key for key, count in counts.items() if count >= bound]

    async def _wait_for_slot(self, timeout_s: float) -> None:
        self.freed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.freed.wait()

    async def _run_one(self, job: dict, dest: str, owner: str) -> None:
        try:
            await self.deliver(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ours, not the receiver's (MongoDB down): due again shortly
            logger.warning("callback of job %s not delivered: %s", job["_id"], type(exc).__name__)
            with contextlib.suppress(Exception):
                await self.store.release_callback(job["_id"], delay_s=ERROR_PAUSE_S)
        finally:
            for counts, key in ((self.by_destination, dest), (self.by_owner, owner)):
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self.freed.set()

    # -- one delivery -----------------------------------------------------------------------

    async def deliver(self, job: dict) -> Delivery:
        """POST the job's document, signed; record the outcome (and when to try again)."""
        settings, callback = self.settings, job["callback"]
        body = json.dumps(public_view(job), separators=(",", ":"), default=str).encode()
        attempts = callback.get("attempts", 0) + 1
        try:
            secret = await self.secrets.get(job.get("owner") or "")
        except NotFoundError:  # its user is gone: nothing could sign it
            await self.store.record_callback(
                job["_id"], delivered=False, error="refused: the job's owner no longer exists", retry_in_s=None
            )
            return Delivery(False, "refused: the job's owner no longer exists")
        if secret is None:  # made at submission; gone only if an operator removed it: never sign with a new one
            error = "refused: the tenant has no callback secret; make one with POST /v1/callbacks/secret"
            await self.store.record_callback(job["_id"], delivered=False, error=error, retry_in_s=None)
            return Delivery(False, error)
        headers: dict[str, Any] = {
            "Content-Type": "application/json",
            CALLBACK_ID_HEADER: job["_id"],
            "X-Callback-Attempt": str(attempts),
            SIGNATURE_HEADER: sign(secret, body),
        }
        outcome = await self.outbound.post(callback["url"], body, headers)
        retry_in = None
        if not outcome.delivered and attempts < settings.callback_max_attempts:
            retry_in = settings.callback_retry_delay_s * 2 ** (attempts - 1)
        await self.store.record_callback(
            job["_id"], delivered=outcome.delivered, error=outcome.error, retry_in_s=retry_in
        )
        return outcome

    async def close(self) -> None:
        """Stop every delivery in flight; their claims lapse and another worker delivers them."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
