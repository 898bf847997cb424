"""Users and API keys in MongoDB (`users`, `api_keys`), and what Redis holds for them.

A key's stored document keeps the SHA-256 of the key, never the key. Revoking a key drops its
cached lookups and sessions from Redis and leaves a deny entry (`revoked:<key id>`) that
outlives every cached copy; with MongoDB down, the deny entry alone refuses the key everywhere.
Each user has one secret that signs its jobs' callbacks (kept as is: an HMAC needs the key).
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError
from redis.asyncio import Redis

from serve_app.auth.credentials import (
    KEY_PREFIX,
    SCOPES,
    USER_NAME_PATTERN,
    Principal,
    auth_key,
    deny_key,
    digest,
    fallback_key,
    new_credential,
    session_key,
    sessions_key,
)
from serve_app.errors import (
    APIError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from serve_app.infra.clients import Clients
from serve_app.infra.redis import GuardedRedis
from serve_app.outbound import new_secret as new_callback_secret
from serve_app.settings import Settings

logger = logging.getLogger(__name__)

_USER_NAME = re.compile(USER_NAME_PATTERN)
MIN_RATE_PER_S = 0.01  # slower buckets would hold state for days


def _now() -> datetime:
    return datetime.now(UTC)


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
                    "refuses the key meanwhile (a Redis deny entry). Revoke it again once MongoDB is back.",
                    service="mongodb",
                ) from exc
            raise ServiceUnavailableError(
                f"MongoDB and Redis are unavailable: key {key_id} is NOT revoked; try again shortly",
                service="mongodb",
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
            sessions = await redis.smembers(sessions_key(doc["_id"]))
            names = [auth_key(doc["hash"]), fallback_key(doc["hash"]), sessions_key(doc["_id"])]
            names += [session_key(s.decode() if isinstance(s, bytes) else s) for s in sessions]
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


@asynccontextmanager
async def open_key_store(settings: Settings) -> AsyncIterator[KeyStore]:
    """A key store with its own clients, for processes outside the gateway (the admin CLI, the bring-up, tests)."""
    clients = Clients.from_settings(settings)
    try:
        yield KeyStore(clients.db, clients.redis, settings)
    finally:
        await clients.close()


async def issue_key(settings: Settings, owner: str, description: str, **options: object) -> str:
    """A new key for `owner`, creating that user first if it does not exist (tests, the benchmark)."""
    async with open_key_store(settings) as store:
        if await store.users.find_one({"_id": owner}) is None:
            try:
                await store.create_user(owner, description)
            except APIError as exc:
                if exc.status_code != 409:  # made meanwhile by another process: fine
                    raise
        key, _ = await store.create_key(owner, **options)
        return key
