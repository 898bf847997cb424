"""API keys, users, sessions and per-key limits.

Credentials are random and carry the id of their key, so a key can be named in logs and
lists without its secret:

    ik_<key id>_<secret>   an API key (shown once, at creation; MongoDB keeps its SHA-256)
    is_<key id>_<secret>   a session token from POST /v1/auth/login (kept in Redis only)

The hot path costs one Redis round trip: one Lua script reads the cached key (`auth:<sha256>`)
and takes a token from that key's bucket (`rate:<key id>`). On a cache miss the key is read
from MongoDB (which also stamps its last use) and cached for `auth_cache_ttl_s`, or until it
expires, whichever is sooner. Revoking a key deletes its cache entry and its sessions; were
Redis unreachable at that moment, the cached entry still lapses within `auth_cache_ttl_s`.

Redis down: keys are checked against MongoDB on every request, rate limits and job quotas are
not enforced (NGINX's per-address limits still are), and sessions cannot be used (503).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError
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
from serve_app.result_cache import GuardedRedis
from serve_app.settings import Settings

SCOPES = ("infer", "jobs", "admin")
Scope = Literal["infer", "jobs", "admin"]
KEY_PREFIX = "ik"
SESSION_PREFIX = "is"
_CREDENTIAL = re.compile(r"^(ik|is)_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MIN_RATE_PER_S = 0.01  # slower buckets would hold state for days
_UNAVAILABLE = object()  # what a guarded Redis call answers when Redis is down

# KEYS[1]: the cached key or session; KEYS[2]: the key's token bucket.
# Returns nil (not cached), {"!reason", 0} (a cached refusal), {session, -1} (the session's key
# must be checked again: its own cached lookup has lapsed) or {principal, allowed, retry_after_s}.
# A session holds its key's hash and lives only while that key's lookup does ('auth:<hash>' is
# read here without being declared: fine on one Redis, not on Redis Cluster).
_AUTHORIZE = """
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
return {cached, allowed, tostring(retry)}
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Principal:
        data = json.loads(raw)
        data["scopes"] = tuple(data["scopes"])
        return cls(**data)

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
            await self.keys.create_index([("hash", ASCENDING)], name="hash", unique=True)
            await self.keys.create_index([("owner", ASCENDING), ("created_at", ASCENDING)], name="owner")
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
        """Revoke a key: refused from now on, its sessions ended, its cache entry dropped."""
        doc = await self.keys.find_one_and_update(
            {"_id": key_id},
            [{"$set": {"revoked": True, "revoked_at": {"$ifNull": ["$revoked_at", "$$NOW"]}}}],
            return_document=ReturnDocument.AFTER,
        )
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
        """Drop what Redis holds for a key (its cached lookup and its sessions)."""

        async def drop(redis: Redis) -> None:
            sessions = await redis.smembers(_sessions_key(doc["_id"]))
            names = [_auth_key(doc["hash"]), _sessions_key(doc["_id"])]
            names += [_session_key(s.decode() if isinstance(s, bytes) else s) for s in sessions]
            await redis.delete(*names)

        await self.redis.run(drop, None)

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
        )


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
        self._admit_job = redis.redis.register_script(_ADMIT_JOB)

    async def authenticate(self, raw: str | None, *, recheck: bool = True) -> Principal:
        credential = Credential.parse(raw)
        bucket = f"rate:{credential.key_id}"
        answer = await self._run_authorize(credential.cache_key, bucket)
        if answer is None:  # not cached
            if credential.kind == "session":
                raise AuthenticationError("the session has expired or was ended; log in again", code="invalid_session")
            await self._load(credential)
            answer = await self._run_authorize(credential.cache_key, bucket)
            if answer is None:  # cached and evicted at once, or Redis just failed: no limit this time
                answer = _UNAVAILABLE
        if answer is _UNAVAILABLE:
            if credential.kind == "session":
                raise ServiceUnavailableError("sessions are unavailable (Redis is down); use an API key")
            return await self._load(credential)
        cached, allowed, retry_after = answer
        cached = cached.decode() if isinstance(cached, bytes) else cached
        if cached.startswith("!"):
            if credential.kind == "session":
                await self.redis.run(lambda r: r.delete(credential.cache_key), None)
            raise AuthenticationError(cached[1:])
        if allowed == -1:  # a session whose key's lookup lapsed: check the key, then try once more
            if not recheck:
                raise ServiceUnavailableError("the session's key could not be checked; try again shortly")
            await self._load_key(Principal.from_json(cached).key_sha or "", credential.key_id)
            return await self.authenticate(raw, recheck=False)
        principal = Principal.from_json(cached)
        if principal.key_id != credential.key_id:
            raise AuthenticationError("invalid API key")
        if not allowed:
            raise RateLimitError(
                f"key {principal.key_id} is over its rate limit of {principal.rate_per_s:g} requests/s "
                f"(burst {principal.burst})",
                retry_after_s=float(retry_after),
            )
        return principal

    async def _run_authorize(self, cache_key: str, bucket: str) -> Any:
        return await self.redis.run(lambda r: self._authorize(keys=[cache_key, bucket], client=r), _UNAVAILABLE)

    async def _load(self, credential: Credential) -> Principal:
        return await self._load_key(credential.sha, credential.key_id)

    async def _load_key(self, sha: str, key_id: str) -> Principal:
        """Read the key from MongoDB and cache the answer (a refusal too, so floods of it stay cheap)."""
        try:
            doc = await self.keys.lookup(sha)
        except PyMongoError as exc:
            raise ServiceUnavailableError("the key store (MongoDB) is unavailable; try again shortly") from exc
        reason = refusal(doc)
        if doc is not None and doc["_id"] != key_id:
            reason = "invalid API key"
        ttl_s = self.settings.auth_cache_ttl_s
        if reason is not None:
            await self.redis.run(lambda r: r.set(_auth_key(sha), "!" + reason, px=int(ttl_s * 1000)), None)
            raise AuthenticationError(reason)
        principal = self.keys.principal(doc)
        ttl_ms = int(principal.ttl_s(ttl_s) * 1000)
        if ttl_ms > 0:
            await self.redis.run(lambda r: r.set(_auth_key(sha), principal.to_json(), px=ttl_ms), None)
        return principal

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
