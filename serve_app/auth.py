"""API keys, users, sessions and per-key limits.

Credentials are random and carry the id of their key, so a key can be named in logs and
lists without its secret:

    ik_<key id>_<secret>   an API key (shown once, at creation; MongoDB keeps its SHA-256)
    is_<key id>_<secret>   a session token from POST /v1/auth/login (kept in Redis only)

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

Work: a request's cache misses cost estimated model tokens, taken from the key's token bucket
(`work:<key id>`) before any model work, and each model call holds a lease on the key's
in-flight allowance (`inflight:<key id>`, a sorted set of leases that lapse on their own); see
WorkMeter.

Redis down: keys are checked against MongoDB on every request, rate limits, work budgets and job
quotas are not enforced (NGINX's per-address limits still are), and sessions cannot be used (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError
from redis.asyncio import Redis

from serve_app.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from serve_app.outbound import new_secret as new_callback_secret
from serve_app.result_cache import GuardedRedis
from serve_app.settings import Settings

logger = logging.getLogger(__name__)

SCOPES = ("infer", "jobs", "admin")
Scope = Literal["infer", "jobs", "admin"]
KEY_PREFIX = "ik"
SESSION_PREFIX = "is"
_CREDENTIAL = re.compile(r"^(ik|is)_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MIN_RATE_PER_S = 0.01  # slower buckets would hold state for days
_UNAVAILABLE = object()  # what a guarded Redis call answers when Redis is down
MONGO_RETRY_AFTER_S = 5.0  # after a failed key lookup, go straight to the fallback this long
INFLIGHT_POLL_S = (0.01, 0.1)  # a request waiting for its key's in-flight allowance polls this often

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

# KEYS[1]: a key's set of active jobs. ARGV: job id, limit, now. 1 if admitted, 0 if full.
_ADMIT_JOB = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""


def digest(credential: str) -> str:
    """What is stored and looked up instead of a credential: its SHA-256 (credentials are random)."""
    return hashlib.sha256(credential.encode()).hexdigest()


def new_credential(prefix: str, key_id: str) -> str:
    return f"{prefix}_{key_id}_{secrets.token_urlsafe(32)}"


def active_jobs_key(key_id: str) -> str:
    return f"jobs:active:{key_id}"


def _sessions_key(key_id: str) -> str:
    return f"sessions:{key_id}"


def _auth_key(sha: str) -> str:
    return f"auth:{sha}"


def fallback_key(sha: str) -> str:
    """The last good (or refused) lookup of a key, read only while MongoDB fails."""
    return f"authlast:{sha}"


def deny_key(key_id: str) -> str:
    """A revoked key, refused while this exists: set by every revocation (outliving every cached copy
    of the key), and with no expiry by a revocation MongoDB could not record."""
    return f"revoked:{key_id}"


def work_bucket_key(key_id: str) -> str:
    return f"work:{key_id}"


def inflight_key(key_id: str) -> str:
    return f"inflight:{key_id}"


def _session_key(sha: str) -> str:
    return f"session:{sha}"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Credential:
    kind: Literal["key", "session"]
    key_id: str
    raw: str

    @classmethod
    def parse(cls, raw: str | None) -> Credential:
        if not raw:
            raise AuthenticationError(
                "no API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", code="missing_api_key"
            )
        match = _CREDENTIAL.match(raw.strip())
        if match is None:
            raise AuthenticationError("malformed API key: expected ik_<id>_<secret> or a session token")
        prefix, key_id, _ = match.groups()
        return cls("key" if prefix == KEY_PREFIX else "session", key_id, match.group(0))

    @property
    def sha(self) -> str:
        return digest(self.raw)

    @property
    def cache_key(self) -> str:
        return _auth_key(self.sha) if self.kind == "key" else _session_key(self.sha)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key (and its owner, the tenant), what it may do, and its limits."""

    key_id: str
    owner: str
    scopes: tuple[str, ...]
    rate_per_s: float
    burst: int
    max_jobs: int
    expires_at: float | None  # epoch seconds
    via: Literal["key", "session"] = "key"
    key_sha: str | None = None  # a session's key, checked with every use of the session
    # The work budget (estimated model tokens of cache misses); None: the setting's default.
    token_rate_per_s: float | None = None
    token_burst: int | None = None
    max_inflight_tokens: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Principal:
        data = json.loads(raw)
        data["scopes"] = tuple(data["scopes"])
        return cls(**{k: v for k, v in data.items() if k in _PRINCIPAL_FIELDS})

    def require(self, scope: str) -> Principal:
        if scope not in self.scopes:
            raise PermissionDeniedError(
                f"key {self.key_id} lacks the {scope!r} scope (it has: {', '.join(self.scopes) or 'none'})"
            )
        return self

    def ttl_s(self, cap_s: float) -> float:
        """How long this principal may be cached or a session may live: the cap, or until expiry."""
        if self.expires_at is None:
            return cap_s
        return min(cap_s, self.expires_at - time.time())


class KeyStore:
    """Users and API keys in MongoDB (`users`, `api_keys`), and their Redis entries."""

    def __init__(self, db: AsyncDatabase, redis: GuardedRedis, settings: Settings) -> None:
        self.users = db["users"]
        self.keys = db["api_keys"]
        self.redis = redis
        self.settings = settings
        self._indexes_ready = False

    async def ensure_indexes(self) -> None:
        if not self._indexes_ready:
            try:
                await self.keys.create_index([("hash", ASCENDING)], name="hash", unique=True)
                await self.keys.create_index([("owner", ASCENDING), ("created_at", ASCENDING)], name="owner")
            except ConnectionFailure as exc:  # MongoDB down: what needs it fails on its own, and says so
                logger.warning("key indexes not checked: MongoDB is unavailable: %s", exc)
                return
            self._indexes_ready = True

    # -- users ---------------------------------------------------------------------------------

    async def create_user(self, name: str, description: str | None = None) -> dict:
        if not _USER_NAME.match(name):
            raise InvalidRequestError(
                "a user name is 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit",
                param="name",
            )
        doc = {"_id": name, "description": description, "created_at": _now(), "disabled": False}
        try:
            await self.users.insert_one(doc)
        except DuplicateKeyError as exc:
            raise ConflictError(f"user {name!r} already exists", param="name") from exc
        return doc

    async def get_user(self, name: str) -> dict:
        doc = await self.users.find_one({"_id": name})
        if doc is None:
            raise NotFoundError(f"no user {name!r}", param="name")
        return doc

    async def list_users(self) -> list[dict]:
        return await self.users.find().sort("_id", ASCENDING).to_list(None)

    async def disable_user(self, name: str) -> dict:
        """Disable a user and revoke every key it has."""
        doc = await self.users.find_one_and_update(
            {"_id": name},
            {"$set": {"disabled": True, "disabled_at": _now()}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise NotFoundError(f"no user {name!r}", param="name")
        async for key in self.keys.find({"owner": name, "revoked": False}, {"_id": 1}):
            await self.revoke_key(key["_id"])
        return doc

    # -- callback signing secrets: one per user, kept as is (an HMAC needs the key itself) ------

    async def callback_secret(self, name: str) -> str | None:
        """The user's current callback secret; None if it has none (NotFoundError: no such user)."""
        doc = await self.users.find_one({"_id": name}, {"callback_secret": 1})
        if doc is None:
            raise NotFoundError(f"no user {name!r}", param="name")
        return (doc.get("callback_secret") or {}).get("value")

    async def ensure_callback_secret(self, name: str) -> tuple[str, bool]:
        """(the user's callback secret, whether it was made just now): made once, atomically."""
        for _ in range(3):
            made = {"value": new_callback_secret(), "created_at": _now()}
            result = await self.users.update_one(
                {"_id": name, "callback_secret.value": {"$exists": False}}, {"$set": {"callback_secret": made}}
            )
            if result.modified_count:
                return made["value"], True
            secret = await self.callback_secret(name)
            if secret is not None:
                return secret, False
            # unset meanwhile (a submission that failed took back the secret it made): make it again
        raise ConflictError(f"the callback secret of user {name!r} keeps changing; try again")

    async def forget_callback_secret(self, name: str, value: str) -> None:
        """Take back a secret just made whose answer never reached its tenant, so the next one shows it."""
        await self.users.update_one({"_id": name, "callback_secret.value": value}, {"$unset": {"callback_secret": ""}})

    async def rotate_callback_secret(self, name: str) -> dict:
        """A new callback secret for the user, replacing any: {"value", "created_at"}, shown only now."""
        made = {"value": new_callback_secret(), "created_at": _now()}
        result = await self.users.update_one({"_id": name}, {"$set": {"callback_secret": made}})
        if not result.matched_count:
            raise NotFoundError(f"no user {name!r}", param="name")
        return made

    # -- keys ----------------------------------------------------------------------------------

    async def create_key(
        self,
        owner: str,
        *,
        name: str | None = None,
        scopes: list[str] | tuple[str, ...] = ("infer", "jobs"),
        expires_at: datetime | None = None,
        rate_per_s: float | None = None,
        burst: int | None = None,
        max_jobs: int | None = None,
        token_rate_per_s: float | None = None,
        token_burst: int | None = None,
        max_inflight_tokens: int | None = None,
    ) -> tuple[str, dict]:
        """A new key for an enabled user: (the key itself, shown only now; its stored document)."""
        await self.ensure_indexes()
        user = await self.get_user(owner)
        if user.get("disabled"):
            raise ConflictError(f"user {owner!r} is disabled", param="owner")
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise InvalidRequestError(f"scopes must be some of {', '.join(SCOPES)}; got {scopes}", param="scopes")
        if expires_at is not None and expires_at <= _now():
            raise InvalidRequestError("expires_at is in the past", param="expires_at")
        if rate_per_s is not None and 0 < rate_per_s < MIN_RATE_PER_S:
            raise InvalidRequestError(f"a rate is 0 (unlimited) or at least {MIN_RATE_PER_S}/s", param="rate_per_s")
        if token_rate_per_s is not None and 0 < token_rate_per_s < MIN_RATE_PER_S:
            raise InvalidRequestError(
                f"a token rate is 0 (unlimited) or at least {MIN_RATE_PER_S}/s", param="token_rate_per_s"
            )
        for name, value, least in (("token_burst", token_burst, 1), ("max_inflight_tokens", max_inflight_tokens, 0)):
            if value is not None and value < least:
                raise InvalidRequestError(f"{name} is at least {least}", param=name)
        key_id = secrets.token_hex(8)
        key = new_credential(KEY_PREFIX, key_id)
        doc = {
            "_id": key_id,
            "hash": digest(key),
            "prefix": key[:12],
            "owner": owner,
            "name": name,
            "scopes": [s for s in SCOPES if s in scopes],
            "created_at": _now(),
            "last_used_at": None,
            "expires_at": expires_at,
            "revoked": False,
            "revoked_at": None,
            "rate_per_s": rate_per_s,
            "burst": burst,
            "max_jobs": max_jobs,
            "token_rate_per_s": token_rate_per_s,
            "token_burst": token_burst,
            "max_inflight_tokens": max_inflight_tokens,
        }
        await self.keys.insert_one(doc)
        if (await self.get_user(owner)).get("disabled"):  # disabled meanwhile: its keys must not outlive it
            await self.revoke_key(key_id)
            raise ConflictError(f"user {owner!r} is disabled", param="owner")
        return key, doc

    async def get_key(self, key_id: str) -> dict:
        doc = await self.keys.find_one({"_id": key_id})
        if doc is None:
            raise NotFoundError(f"no key {key_id!r}", param="key_id")
        return doc

    async def list_keys(self, owner: str | None = None) -> list[dict]:
        query = {} if owner is None else {"owner": owner}
        return await self.keys.find(query).sort("created_at", ASCENDING).to_list(None)

    async def revoke_key(self, key_id: str) -> dict:
        """Revoke a key: refused from now on, its sessions ended, its cache entries dropped.

        MongoDB down: the key is denied in Redis (every gateway refuses it at once, the fallback
        included) and a 503 says that MongoDB has not recorded it: revoke it again once MongoDB is
        back. The deny entry has no expiry, so the key stays refused until then.
        """
        try:
            doc = await self.keys.find_one_and_update(
                {"_id": key_id},
                [{"$set": {"revoked": True, "revoked_at": {"$ifNull": ["$revoked_at", "$$NOW"]}}}],
                return_document=ReturnDocument.AFTER,
            )
        except PyMongoError as exc:
            reason = f"API key {key_id} has been revoked"
            if await self.redis.run(lambda r: r.set(deny_key(key_id), reason), None):
                raise ServiceUnavailableError(
                    f"MongoDB is unavailable, so the revocation of key {key_id} is not stored; every gateway "
                    "refuses the key meanwhile (a Redis deny entry). Revoke it again once MongoDB is back."
                ) from exc
            raise ServiceUnavailableError(
                f"MongoDB and Redis are unavailable: key {key_id} is NOT revoked; try again shortly"
            ) from exc
        if doc is None:
            raise NotFoundError(f"no key {key_id!r}", param="key_id")
        await self.forget(doc)
        return doc

    async def rotate_key(self, key_id: str, grace_s: float) -> tuple[str, dict, dict]:
        """A new key like this one; the old one expires after `grace_s` (0: revoked now)."""
        old = await self.get_key(key_id)
        if (reason := refusal(old)) is not None:
            raise ConflictError(f"{reason}; create a new key instead", param="key_id")
        expires = old.get("expires_at")
        key, new = await self.create_key(
            old["owner"],
            name=old.get("name"),
            scopes=old["scopes"],
            # the same lifetime as the old key, counted from now (none if it had none)
            expires_at=_now() + (expires - old["created_at"]) if expires else None,
            rate_per_s=old.get("rate_per_s"),
            burst=old.get("burst"),
            max_jobs=old.get("max_jobs"),
            token_rate_per_s=old.get("token_rate_per_s"),
            token_burst=old.get("token_burst"),
            max_inflight_tokens=old.get("max_inflight_tokens"),
        )
        if grace_s <= 0:
            old = await self.revoke_key(key_id)
        else:
            until = _now() + timedelta(seconds=grace_s)
            if old.get("expires_at") is None or old["expires_at"] > until:
                old = await self.keys.find_one_and_update(
                    {"_id": key_id}, {"$set": {"expires_at": until}}, return_document=ReturnDocument.AFTER
                )
                await self.forget(old)
        return key, new, old

    async def forget(self, doc: dict) -> None:
        """Drop what Redis holds for a key (its cached lookups, the fallback copy too, and its sessions)."""

        async def drop(redis: Redis) -> bool:
            sessions = await redis.smembers(_sessions_key(doc["_id"]))
            names = [_auth_key(doc["hash"]), fallback_key(doc["hash"]), _sessions_key(doc["_id"])]
            names += [_session_key(s.decode() if isinstance(s, bytes) else s) for s in sessions]
            await redis.delete(*names)
            if doc.get("revoked"):
                # A lookup that read the key just before the revocation may cache it again after
                # these deletes; the deny entry outlives every copy such a lookup could write.
                ttl_s = self.settings.auth_fallback_ttl_s + self.settings.auth_cache_ttl_s
                await redis.set(deny_key(doc["_id"]), f"API key {doc['_id']} has been revoked", ex=int(ttl_s) + 1)
            return True

        if not await self.redis.run(drop, False) and doc.get("revoked"):
            logger.warning(
                "key %s is revoked in MongoDB, but Redis could not be told: its cached copies lapse on their own "
                "(within %gs while MongoDB answers)",
                doc["_id"],
                self.settings.auth_cache_ttl_s,
            )

    async def lookup(self, sha: str) -> dict | None:
        """The key with this hash, its last use stamped; None if there is none."""
        return await self.keys.find_one_and_update(
            {"hash": sha}, {"$set": {"last_used_at": _now()}}, return_document=ReturnDocument.AFTER
        )

    def principal(self, doc: dict) -> Principal:
        s = self.settings
        expires = doc.get("expires_at")
        return Principal(
            key_id=doc["_id"],
            owner=doc["owner"],
            scopes=tuple(doc["scopes"]),
            rate_per_s=float(s.rate_limit_per_s if doc.get("rate_per_s") is None else doc["rate_per_s"]),
            burst=int(s.rate_limit_burst if doc.get("burst") is None else doc["burst"]),
            max_jobs=int(s.max_concurrent_jobs if doc.get("max_jobs") is None else doc["max_jobs"]),
            expires_at=expires.timestamp() if expires else None,
            token_rate_per_s=float(_either(doc.get("token_rate_per_s"), s.token_rate_per_s)),
            token_burst=int(_either(doc.get("token_burst"), s.token_burst)),
            max_inflight_tokens=int(_either(doc.get("max_inflight_tokens"), s.max_inflight_tokens)),
        )


def _either(value: float | None, default: float) -> float:
    return default if value is None else value


_PRINCIPAL_FIELDS = set(Principal.__dataclass_fields__)


def refusal(doc: dict | None) -> str | None:
    """Why this stored key may not be used, or None if it may."""
    if doc is None:
        return "invalid API key"
    if doc["revoked"]:
        return f"API key {doc['_id']} has been revoked"
    expires = doc.get("expires_at")
    if expires is not None and expires <= _now():
        return f"API key {doc['_id']} expired at {expires.isoformat()}"
    return None


class Authenticator:
    """Turns a presented credential into a Principal, applying the key's rate limit."""

    def __init__(self, settings: Settings, keys: KeyStore, redis: GuardedRedis) -> None:
        self.settings = settings
        self.keys = keys
        self.redis = redis
        self._authorize = redis.redis.register_script(_AUTHORIZE)
        self._fallback = redis.redis.register_script(_FALLBACK)
        self._admit_job = redis.redis.register_script(_ADMIT_JOB)
        self._admit_work = redis.redis.register_script(_ADMIT_WORK)
        self._lease = redis.redis.register_script(_LEASE)
        self._refund = redis.redis.register_script(_REFUND)
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
                answer = _UNAVAILABLE
        if answer is _UNAVAILABLE:
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
        return await self.redis.run(lambda r: self._authorize(keys=[cache_key, bucket, deny], client=r), _UNAVAILABLE)

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
                pipe.set(_auth_key(sha), value, px=int(ttl_s * 1000))
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
        keys = [fallback_key(sha), _auth_key(sha), deny_key(key_id)]
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

    # -- work: estimated model tokens of cache misses ------------------------------------------

    def meter(self, principal: Principal) -> WorkMeter:
        """The work budget of one request of this key."""
        s = self.settings
        return WorkMeter(
            self,
            principal.key_id,
            rate_per_s=float(_either(principal.token_rate_per_s, s.token_rate_per_s)),
            burst=int(_either(principal.token_burst, s.token_burst)),
            max_inflight=int(_either(principal.max_inflight_tokens, s.max_inflight_tokens)),
            wait_s=s.inflight_wait_s,
            lease_ttl_s=s.model_timeout_s + 10,
        )

    # -- sessions ------------------------------------------------------------------------------

    async def login(self, principal: Principal) -> tuple[str, float]:
        """A session token for this key's principal: (token, lifetime in seconds)."""
        if principal.via != "key":
            raise InvalidRequestError("log in with an API key, not with a session token")
        try:  # the key as stored now, not as cached: a key revoked a moment ago makes no session
            doc = await self.keys.keys.find_one({"_id": principal.key_id})
        except PyMongoError as exc:
            raise ServiceUnavailableError("the key store (MongoDB) is unavailable; try again shortly") from exc
        if (reason := refusal(doc)) is not None:
            raise AuthenticationError(reason)
        principal = self.keys.principal(doc)
        ttl_s = principal.ttl_s(self.settings.session_ttl_s)
        token = new_credential(SESSION_PREFIX, principal.key_id)
        session = Principal(**{**asdict(principal), "via": "session", "key_sha": doc["hash"]})
        sha = digest(token)

        async def store(redis: Redis) -> bool:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.set(_session_key(sha), session.to_json(), px=int(ttl_s * 1000))
                pipe.sadd(_sessions_key(principal.key_id), sha)
                pipe.expire(_sessions_key(principal.key_id), int(self.settings.session_ttl_s) + 60)
                await pipe.execute()
            return True

        if await self.redis.run(store, False) is not True:
            raise ServiceUnavailableError("sessions are unavailable (Redis is down); use an API key")
        return token, ttl_s

    async def logout(self, raw: str) -> bool:
        credential = Credential.parse(raw)
        if credential.kind != "session":
            raise InvalidRequestError("logout ends a session; present the session token, not an API key")

        async def drop(redis: Redis) -> int:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(_session_key(credential.sha))
                pipe.srem(_sessions_key(credential.key_id), credential.sha)
                deleted, _ = await pipe.execute()
            return deleted

        return bool(await self.redis.run(drop, 0))

    # -- concurrent jobs -----------------------------------------------------------------------

    async def admit_job(self, principal: Principal, job_id: str) -> bool | None:
        """Count a new job against the key's quota: True admitted, False full, None not enforced."""
        if principal.max_jobs <= 0:
            return None
        answer = await self.redis.run(
            lambda r: self._admit_job(
                keys=[active_jobs_key(principal.key_id)], args=[job_id, principal.max_jobs, time.time()], client=r
            ),
            _UNAVAILABLE,
        )
        return None if answer is _UNAVAILABLE else bool(answer)

    async def active_jobs(self, key_id: str, older_than_s: float) -> list[str]:
        """Jobs counted against the key, admitted more than `older_than_s` ago."""
        cutoff = time.time() - older_than_s
        members = await self.redis.run(lambda r: r.zrangebyscore(active_jobs_key(key_id), "-inf", cutoff), [])
        return [m.decode() if isinstance(m, bytes) else m for m in members]

    async def release_jobs(self, key_id: str, job_ids: list[str]) -> None:
        if job_ids:
            await self.redis.run(lambda r: r.zrem(active_jobs_key(key_id), *job_ids), None)


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
        auth: Authenticator,
        key_id: str,
        *,
        rate_per_s: float,
        burst: int,
        max_inflight: int,
        wait_s: float,
        lease_ttl_s: float,
    ) -> None:
        self.auth = auth
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
        answer = await self.auth.redis.run(lambda r: self.auth._admit_work(keys=keys, args=args, client=r), None)
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
        answer = await self.auth.redis.run(lambda r: self.auth._lease(keys=keys, args=args, client=r), None)
        if answer is None:
            await self._forget_lost(member)
            return self.NOT_ENFORCED
        return member if answer else None

    async def _forget_lost(self, member: str) -> None:
        """A script whose reply was lost may have run: its lease must not hold the key's allowance.

        Straight to the client, past the guard (which skips Redis for a while after an error): if Redis
        answers again this removes it; if not, the lease lapses by itself after `lease_ttl_s`."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.auth.redis.redis.zrem(inflight_key(self.key_id), member), 1.0)

    async def release(self, lease: str) -> None:
        if lease:
            await self.auth.redis.run(lambda r: r.zrem(inflight_key(self.key_id), lease), None)

    async def refund(self, tokens: int) -> None:
        """Give back tokens charged for work that was not done (the request failed part way)."""
        tokens = min(tokens, self.charged)
        if tokens > 0 and self.rate_per_s > 0:
            self.charged -= tokens
            keys = [work_bucket_key(self.key_id)]
            await self.auth.redis.run(lambda r: self.auth._refund(keys=keys, args=[tokens], client=r), None)

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
