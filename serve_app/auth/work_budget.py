"""Limits on work, not requests: estimated model tokens of a key's cache misses.

A request's cache misses cost estimated model tokens, taken from the key's token bucket
(`work:<key id>`) before any model work, and each model call holds a lease on the key's
in-flight allowance (`inflight:<key id>`, a sorted set of leases that lapse on their own).
Both are Lua scripts, so every gateway shares one budget per key. See WorkMeter.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets

from serve_app.auth.authenticator import ratelimit_headers
from serve_app.auth.credentials import Principal
from serve_app.errors import RateLimitError
from serve_app.infra.redis import GuardedRedis
from serve_app.settings import Settings

INFLIGHT_POLL_S = (0.01, 0.1)  # a request waiting for its key's in-flight allowance polls this often

# A key's in-flight allowance: a sorted set of leases '<tokens>:<id>' scored by their deadline, so
# a lease a crashed gateway never released lapses on its own. A lease is granted if it fits under
# the cap, or if the key holds none (a model call bigger than the cap still goes, alone).
_LEASE_FN = """
local function lease(key, member, amount, cap, ttl, now)
  if cap <= 0 then return 1 end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local held = 0
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    held = held + (tonumber(string.match(m, '^(%d+):')) or 0)
  end
  if held > 0 and held + amount > cap then return 0 end
  redis.call('ZADD', key, now + ttl, member)
  redis.call('EXPIRE', key, math.ceil(ttl) + 1)
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# Admit a request's work. KEYS[1]: the key's work bucket; KEYS[2]: its in-flight leases.
# ARGV: cost, rate, burst, first call's tokens, in-flight cap, lease member, lease TTL (s).
# The bucket needs min(cost, burst) tokens and may go into debt, so a request bigger than the bucket
# is admitted when it is full. Returns {admitted, tokens left, retry after s, first call leased}.
_ADMIT_WORK = (
    _LEASE_FN
    + """
local cost = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tokens = burst
if rate > 0 then
  local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  tokens = tonumber(bucket[1]) or burst
  local last = tonumber(bucket[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
  local need = math.min(cost, burst)
  if tokens < need then return {0, tostring(tokens), tostring((need - tokens) / rate), 0} end
  tokens = tokens - cost
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
end
local leased = lease(KEYS[2], ARGV[6], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[7]), now)
return {1, tostring(tokens), '0', leased}
"""
)

# KEYS[1]: a key's in-flight leases. ARGV: member, tokens, cap, TTL (s). 1 if leased, 0 if not now.
_LEASE = _LEASE_FN + "return lease(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), now)"

# Give back tokens a request was charged for but did not use. KEYS[1]: the work bucket. ARGV: tokens.
# A bucket that has lapsed is full already.
_REFUND = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', ARGV[1]) end
return 1
"""


def work_bucket_key(key_id: str) -> str:
    return f"work:{key_id}"


def inflight_key(key_id: str) -> str:
    return f"inflight:{key_id}"


class WorkBudget:
    """The scripts, registered once per process; meter() makes one request's WorkMeter."""

    def __init__(self, settings: Settings, redis: GuardedRedis) -> None:
        self.settings = settings
        self.redis = redis
        self._admit_work = redis.redis.register_script(_ADMIT_WORK)
        self._lease = redis.redis.register_script(_LEASE)
        self._refund = redis.redis.register_script(_REFUND)

    def meter(self, principal: Principal) -> WorkMeter:
        """The work budget of one request of this key."""
        s = self.settings
        rate, burst, inflight = principal.token_rate_per_s, principal.token_burst, principal.max_inflight_tokens
        return WorkMeter(
            self,
            principal.key_id,
            rate_per_s=float(s.token_rate_per_s if rate is None else rate),
            burst=int(s.token_burst if burst is None else burst),
            max_inflight=int(s.max_inflight_tokens if inflight is None else inflight),
            wait_s=s.inflight_wait_s,
            lease_ttl_s=s.model_timeout_s + 10,
        )


class WorkMeter:
    """One request's use of its key's work budget, in estimated model tokens of its cache misses.

    admit() takes the request's whole cost from the key's token bucket before any model work (a
    429 with Retry-After and x-ratelimit-*-tokens if it is short) and, in the same Lua script, a
    lease on the key's in-flight allowance for the first model call. lease() and release() cover
    each further call; a request that cannot get the allowance for `wait_s` gets a 429. Leases
    lapse on their own after `lease_ttl_s`, so a crashed gateway never blocks a key for good.
    Redis down: nothing is enforced (leases are granted, nothing is charged).
    """

    NOT_ENFORCED = ""  # a lease that holds nothing in Redis

    def __init__(
        self,
        budget: WorkBudget,
        key_id: str,
        *,
        rate_per_s: float,
        burst: int,
        max_inflight: int,
        wait_s: float,
        lease_ttl_s: float,
    ) -> None:
        self.budget = budget
        self.key_id = key_id
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_inflight = max_inflight
        self.wait_s = wait_s
        self.lease_ttl_s = lease_ttl_s
        self.headers: dict[str, str] = {}  # x-ratelimit-*-tokens, once admit() has run
        self.charged = 0

    def _member(self, tokens: int) -> str:
        return f"{int(tokens)}:{secrets.token_hex(8)}"

    async def admit(self, cost: int, first_call: int) -> str | None:
        """Charge `cost` tokens; the lease of the first call (of `first_call` tokens), or None if the
        allowance is taken for now. Raises RateLimitError (429) when the bucket is short."""
        member = self._member(first_call)
        args = [cost, self.rate_per_s, self.burst, first_call, self.max_inflight, member, self.lease_ttl_s]
        keys = [work_bucket_key(self.key_id), inflight_key(self.key_id)]
        answer = await self.budget.redis.run(lambda r: self.budget._admit_work(keys=keys, args=args, client=r), None)
        if answer is None:
            await self._forget_lost(member)
            return self.NOT_ENFORCED
        admitted, left, retry_after, leased = answer
        if self.rate_per_s > 0:
            self.headers = ratelimit_headers("tokens", self.burst, float(left), self.rate_per_s)
        if not admitted:
            raise RateLimitError(
                f"key {self.key_id} is over its work budget: this request's cache misses need ~{cost} "
                f"estimated tokens; the key has {max(0, math.floor(float(left)))} of {self.burst} "
                f"(refilled at {self.rate_per_s:g} tokens/s)",
                retry_after_s=float(retry_after),
                code="tokens_rate_limited",
                headers=self.headers,
            )
        self.charged = cost
        if self.max_inflight <= 0:
            return self.NOT_ENFORCED
        return member if leased else None

    async def lease(self, tokens: int) -> str | None:
        """A lease on `tokens` of the key's in-flight allowance, or None if it is taken for now."""
        if self.max_inflight <= 0:
            return self.NOT_ENFORCED
        member = self._member(tokens)
        args = [member, tokens, self.max_inflight, self.lease_ttl_s]
        keys = [inflight_key(self.key_id)]
        answer = await self.budget.redis.run(lambda r: self.budget._lease(keys=keys, args=args, client=r), None)
        if answer is None:
            await self._forget_lost(member)
            return self.NOT_ENFORCED
        return member if answer else None

    async def _forget_lost(self, member: str) -> None:
        """A script whose reply was lost may have run: its lease must not hold the key's allowance.

        Straight to the client, past the guard (which skips Redis for a while after an error): if Redis
        answers again this removes it; if not, the lease lapses by itself after `lease_ttl_s`."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.budget.redis.redis.zrem(inflight_key(self.key_id), member), 1.0)

    async def release(self, lease: str) -> None:
        if lease:
            await self.budget.redis.run(lambda r: r.zrem(inflight_key(self.key_id), lease), None)

    async def refund(self, tokens: int) -> None:
        """Give back tokens charged for work that was not done (the request failed part way)."""
        tokens = min(tokens, self.charged)
        if tokens > 0 and self.rate_per_s > 0:
            self.charged -= tokens
            keys = [work_bucket_key(self.key_id)]
            await self.budget.redis.run(lambda r: self.budget._refund(keys=keys, args=[tokens], client=r), None)

    def busy(self) -> RateLimitError:
        """The 429 for a request that waited `wait_s` for the key's in-flight allowance."""
        return RateLimitError(
            f"key {self.key_id} already has {self.max_inflight} estimated tokens of work at the model "
            f"(its in-flight limit) and none came free within {self.wait_s:g}s; retry when its other "
            "requests have finished",
            retry_after_s=1,
            code="inflight_limit_exceeded",
            headers=self.headers,
        )

    async def wait(self, waited_s: float) -> None:
        """Sleep before asking for the allowance again (a little longer each time)."""
        low, high = INFLIGHT_POLL_S
        await asyncio.sleep(min(high, max(low, waited_s / 4)))
