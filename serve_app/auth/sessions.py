"""Sessions: an API key traded for a short-lived token (POST /v1/auth/login), kept in Redis only.

A session holds its key's hash and lives only while that key's cached lookup does, so revoking
the key ends it (the Authenticator checks the key with every use of a session). Redis down:
sessions cannot be made or used (503); API keys still work.
"""

from __future__ import annotations

from dataclasses import asdict

from pymongo.errors import PyMongoError
from redis.asyncio import Redis

from serve_app.auth.credentials import (
    SESSION_PREFIX,
    Credential,
    Principal,
    digest,
    new_credential,
    session_key,
    sessions_key,
)
from serve_app.auth.key_store import KeyStore, refusal
from serve_app.errors import AuthenticationError, InvalidRequestError, ServiceUnavailableError
from serve_app.infra.redis import GuardedRedis
from serve_app.settings import Settings


class Sessions:
    def __init__(self, settings: Settings, keys: KeyStore, redis: GuardedRedis) -> None:
        self.settings = settings
        self.keys = keys
        self.redis = redis

    async def login(self, principal: Principal) -> tuple[str, float]:
        """A session token for this key's principal: (token, lifetime in seconds)."""
        if principal.via != "key":
            raise InvalidRequestError("log in with an API key, not with a session token")
        try:  # the key as stored now, not as cached: a key revoked a moment ago makes no session
            doc = await self.keys.keys.find_one({"_id": principal.key_id})
        except PyMongoError as exc:
            raise ServiceUnavailableError(
                "the key store (MongoDB) is unavailable; try again shortly", service="mongodb"
            ) from exc
        if (reason := refusal(doc)) is not None:
            raise AuthenticationError(reason)
        principal = self.keys.principal(doc)
        ttl_s = principal.ttl_s(self.settings.session_ttl_s)
        token = new_credential(SESSION_PREFIX, principal.key_id)
        session = Principal(**{**asdict(principal), "via": "session", "key_sha": doc["hash"]})
        sha = digest(token)

        async def store(redis: Redis) -> bool:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.set(session_key(sha), session.to_json(), px=int(ttl_s * 1000))
                pipe.sadd(sessions_key(principal.key_id), sha)
                pipe.expire(sessions_key(principal.key_id), int(self.settings.session_ttl_s) + 60)
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
                pipe.delete(session_key(credential.sha))
                pipe.srem(sessions_key(credential.key_id), credential.sha)
                deleted, _ = await pipe.execute()
            return deleted

        return bool(await self.redis.run(drop, 0))
