"""Each key's concurrent-job quota: its queued and running jobs, counted in Redis.

A key's active jobs are a sorted set (`jobs:active:<key id>`) of job ids scored by admission
time. A job is added when accepted and removed when it ends (JobStore does that with the write
that ends it). Redis down: the quota is not enforced.
"""

from __future__ import annotations

import time

from serve_app.auth.credentials import Principal
from serve_app.infra.redis import UNAVAILABLE, GuardedRedis

# KEYS[1]: a key's set of active jobs. ARGV: job id, limit, now. 1 if admitted, 0 if full.
_ADMIT_JOB = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""


def active_jobs_key(key_id: str) -> str:
    return f"jobs:active:{key_id}"


class JobQuota:
    def __init__(self, redis: GuardedRedis) -> None:
        self.redis = redis
        self._admit_job = redis.redis.register_script(_ADMIT_JOB)

    async def admit(self, principal: Principal, job_id: str) -> bool | None:
        """Count a new job against the key's quota: True admitted, False full, None not enforced."""
        if principal.max_jobs <= 0:
            return None
        answer = await self.redis.run(
            lambda r: self._admit_job(
                keys=[active_jobs_key(principal.key_id)], args=[job_id, principal.max_jobs, time.time()], client=r
            ),
            UNAVAILABLE,
        )
        return None if answer is UNAVAILABLE else bool(answer)

    async def active(self, key_id: str, older_than_s: float) -> list[str]:
        """Jobs counted against the key, admitted more than `older_than_s` ago."""
        cutoff = time.time() - older_than_s
        members = await self.redis.run(lambda r: r.zrangebyscore(active_jobs_key(key_id), "-inf", cutoff), [])
        return [m.decode() if isinstance(m, bytes) else m for m in members]

    async def release(self, key_id: str, job_ids: list[str]) -> None:
        if job_ids:
            await self.redis.run(lambda r: r.zrem(active_jobs_key(key_id), *job_ids), None)

    async def release_ended(self, doc: dict) -> None:
        """An ended job no longer counts against its key's quota (idempotent)."""
        if doc.get("key_id"):
            await self.redis.run(lambda r: r.zrem(active_jobs_key(doc["key_id"]), doc["_id"]), None)
