"""Who is calling: a presented credential becomes a Principal, within its key's request rate.

The hot path costs one Redis round trip: one Lua script checks the key's deny entry
(`revoked:<key id>`), reads the cached key (`auth:<sha256>`) and takes a token from that key's
bucket (`rate:<key id>`). On a cache miss the key is read from MongoDB (which also stamps its
last use) and cached for `auth_cache_ttl_s`, or until it expires, whichever is sooner. Revoking a
key deletes its cache entries and its sessions; were Redis unreachable at that moment, the cached
entry still lapses within `auth_cache_ttl_s`.

MongoDB down: a good lookup is also kept as `authlast:<sha256>` for `auth_fallback_ttl_s` (never
past the key's expiry), read only when MongoDB fails; keys never seen in that time get 503.
A revocation while MongoDB is down is a Redis deny entry (`KeyStore.revoke_key` writes it when
MongoDB refuses the write, and still reports the failure).

Redis down: keys are checked against MongoDB on every request, rate limits, work budgets and job
quotas are not enforced (NGINX's per-address limits still are), and sessions cannot be used (503).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from pymongo.errors import PyMongoError
from redis.asyncio import Redis

from serve_app import metrics
from serve_app.auth.credentials import Credential, Principal, auth_key, deny_key, fallback_key
from serve_app.auth.key_store import KeyStore, refusal
from serve_app.errors import AuthenticationError, RateLimitError, ServiceUnavailableError
from serve_app.infra.redis import UNAVAILABLE, GuardedRedis
from serve_app.settings import Settings

logger = logging.getLogger(__name__)

MONGO_RETRY_AFTER_S = 5.0  # after a failed key lookup, go straight to the fallback this long

# KEYS[1]: the cached key or session; KEYS[2]: the key's token bucket; KEYS[3]: its deny entry.
# Returns nil (not cached), {"!reason", 0} (a cached refusal or a deny entry), {session, -1} (the
# session's key must be checked again: its own cached lookup has lapsed) or
# {principal, allowed, retry_after_s[, tokens left]}.
# A session holds its key's hash and lives only while that key's lookup does ('auth:<hash>' is
# read here without being declared: fine on one Redis, not on Redis Cluster).
_AUTHORIZE = """
local denied = redis.call('GET', KEYS[3])
if denied then return {'!' .. denied, 0, '0'} end
local cached = redis.call('GET', KEYS[1])
if not cached then return nil end
if string.sub(cached, 1, 1) == '!' then return {cached, 0, '0'} end
local p = cjson.decode(cached)
if p.key_sha and p.key_sha ~= cjson.null then
  local key = redis.call('GET', 'auth:' .. p.key_sha)
  if not key then return {cached, -1, '0'} end
  if string.sub(key, 1, 1) == '!' then return {key, 0, '0'} end
end
local rate = tonumber(p.rate_per_s)
local burst = tonumber(p.burst)
if rate <= 0 then return {cached, 1, '0'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
local tokens = tonumber(bucket[1]) or burst
local last = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local allowed = 0
local retry = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  retry = (1 - tokens) / rate
end
redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
return {cached, allowed, tostring(retry), tostring(tokens)}
"""

# MongoDB failed: the last good answer for a key. KEYS[1]: 'authlast:<sha>'; KEYS[2]: 'auth:<sha>';
# KEYS[3]: the key's deny entry. ARGV[1]: the fast path's TTL in ms. Returns nil (never seen, or
# forgotten), '!reason' (refused) or the principal, which is put back on the fast path (for at
# most ARGV[1] ms, never past the fallback copy nor the key's expiry) so the rate limit applies.
_FALLBACK = """
local denied = redis.call('GET', KEYS[3])
if denied then return '!' .. denied end
local last = redis.call('GET', KEYS[1])
if not last then return nil end
if string.sub(last, 1, 1) ~= '!' then
  local ttl = math.min(redis.call('PTTL', KEYS[1]), tonumber(ARGV[1]))
  local expires = cjson.decode(last).expires_at
  if expires and expires ~= cjson.null then
    local t = redis.call('TIME')
    ttl = math.min(ttl, math.floor((tonumber(expires) - tonumber(t[1]) - tonumber(t[2]) / 1000000) * 1000))
  end
  if ttl > 0 then redis.call('SET', KEYS[2], last, 'PX', ttl) end
end
return last
"""


class Authenticator:
    """Turns a presented credential into a Principal, applying the key's rate limit."""

    def __init__(self, settings: Settings, keys: KeyStore, redis: GuardedRedis) -> None:
        self.settings = settings
        self.keys = keys
        self.redis = redis
        self._authorize = redis.redis.register_script(_AUTHORIZE)
        self._fallback = redis.redis.register_script(_FALLBACK)
        self._mongo_retry_at = 0.0  # monotonic; before it, lookups go straight to the fallback

    async def authenticate(
        self, raw: str | None, *, recheck: bool = True, headers: dict[str, str] | None = None
    ) -> Principal:
        """The caller; `headers`, if given, receives the key's x-ratelimit-*-requests headers."""
        credential = Credential.parse(raw)
        bucket = f"rate:{credential.key_id}"
        deny = deny_key(credential.key_id)
        answer = await self._run_authorize(credential.cache_key, bucket, deny)
        if answer is None:  # not cached
            if credential.kind == "session":
                raise AuthenticationError("the session has expired or was ended; log in again", code="invalid_session")
            await self._load(credential)
            answer = await self._run_authorize(credential.cache_key, bucket, deny)
            if answer is None:  # cached and evicted at once, or Redis just failed: no limit this time
                answer = UNAVAILABLE
        if answer is UNAVAILABLE:
            if credential.kind == "session":
                raise ServiceUnavailableError("sessions are unavailable (Redis is down); use an API key")
            return await self._load(credential)
        cached, allowed, retry_after, *rest = answer
        cached = cached.decode() if isinstance(cached, bytes) else cached
        if cached.startswith("!"):
            if credential.kind == "session":
                await self.redis.run(lambda r: r.delete(credential.cache_key), None)
            raise AuthenticationError(cached[1:])
        if allowed == -1:  # a session whose key's lookup lapsed: check the key, then try once more
            if not recheck:
                raise ServiceUnavailableError("the session's key could not be checked; try again shortly")
            await self._load_key(Principal.from_json(cached).key_sha or "", credential.key_id)
            return await self.authenticate(raw, recheck=False, headers=headers)
        principal = Principal.from_json(cached)
        if principal.key_id != credential.key_id:
            raise AuthenticationError("invalid API key")
        limit_headers = {}
        if rest and principal.rate_per_s > 0:
            limit_headers = ratelimit_headers("requests", principal.burst, float(rest[0]), principal.rate_per_s)
        if headers is not None:
            headers.update(limit_headers)
        if not allowed:
            raise RateLimitError(
                f"key {principal.key_id} is over its rate limit of {principal.rate_per_s:g} requests/s "
                f"(burst {principal.burst})",
                retry_after_s=float(retry_after),
                headers=limit_headers,
            )
        return principal

    async def _run_authorize(self, cache_key: str, bucket: str, deny: str) -> Any:
        return await self.redis.run(lambda r: self._authorize(keys=[cache_key, bucket, deny], client=r), UNAVAILABLE)

    async def _load(self, credential: Credential) -> Principal:
        return await self._load_key(credential.sha, credential.key_id)

    async def _load_key(self, sha: str, key_id: str) -> Principal:
        """Read the key from MongoDB and cache the answer (a refusal too, so floods of it stay cheap).

        The answer for a key that exists is also kept as the fallback copy; when MongoDB fails,
        that copy answers instead (see _from_fallback).
        """
        if time.monotonic() < self._mongo_retry_at:  # MongoDB failed a moment ago: do not wait on it again
            return await self._from_fallback(sha, key_id, None)
        try:
            doc = await self.keys.lookup(sha)
        except PyMongoError as exc:
            self._mongo_retry_at = time.monotonic() + MONGO_RETRY_AFTER_S
            metrics.dependency_error("mongodb")  # counted here, where MongoDB failed, not per fallback answer
            logger.warning("key lookup failed (MongoDB); answering from the fallback copies: %r", exc)
            return await self._from_fallback(sha, key_id, exc)
        reason = refusal(doc)
        if doc is not None and doc["_id"] != key_id:
            reason = "invalid API key"
        ttl_s = self.settings.auth_cache_ttl_s
        fallback_s = self.settings.auth_fallback_ttl_s
        known = doc is not None and reason != "invalid API key"  # a key that exists: worth a fallback copy
        if reason is not None:
            await self._remember(sha, "!" + reason, ttl_s, fallback_s if known else 0)
            raise AuthenticationError(reason)
        principal = self.keys.principal(doc)
        await self._remember(sha, principal.to_json(), principal.ttl_s(ttl_s), principal.ttl_s(fallback_s))
        return principal

    async def _remember(self, sha: str, value: str, ttl_s: float, fallback_s: float) -> None:
        """Cache a lookup on the fast path and, when fallback_s > 0, as the fallback copy: one round trip."""
        if ttl_s <= 0:
            return

        async def store(redis: Redis) -> None:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.set(auth_key(sha), value, px=int(ttl_s * 1000))
                if fallback_s > 0:
                    pipe.set(fallback_key(sha), value, px=int(fallback_s * 1000))
                await pipe.execute()

        await self.redis.run(store, None)

    async def _from_fallback(self, sha: str, key_id: str, cause: Exception | None) -> Principal:
        """MongoDB failed: the key's last answer, if it had one within auth_fallback_ttl_s.

        A revoked key never comes from here: revoking deletes the copy (or, with MongoDB down,
        writes a deny entry that is checked first), a copy never outlives its key's expiry, and a
        copy of a refusal refuses.
        """
        unavailable = ServiceUnavailableError(
            "the key store (MongoDB) is unavailable and this key was not used recently; try again shortly"
        )
        if self.settings.auth_fallback_ttl_s <= 0:
            raise unavailable from cause
        keys = [fallback_key(sha), auth_key(sha), deny_key(key_id)]
        ttl_ms = int(self.settings.auth_cache_ttl_s * 1000)
        last = await self.redis.run(lambda r: self._fallback(keys=keys, args=[ttl_ms], client=r), None)
        if last is None:
            raise unavailable from cause
        last = last.decode() if isinstance(last, bytes) else last
        if last.startswith("!"):
            raise AuthenticationError(last[1:])
        principal = Principal.from_json(last)
        if principal.key_id != key_id:
            raise AuthenticationError("invalid API key")
        if principal.expires_at is not None and principal.expires_at <= time.time():
            raise AuthenticationError(f"API key {key_id} has expired")
        return principal


def _duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: 20ms, 1.5s, 6m0s, 1h2m3s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    return (f"{hours}h" if hours else "") + f"{rest // 60}m{rest % 60}s"


def ratelimit_headers(kind: str, limit: int, left: float, rate_per_s: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for a token bucket: its size, what is left in it now, and the
    time until it is full again. `kind` is "requests" or "tokens"."""
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(left))),
        f"x-ratelimit-reset-{kind}": _duration(max(0.0, limit - left) / rate_per_s),
    }
