"""Users and API keys as the admin API shows them: the service in front of KeyStore.

Every method takes plain values and returns a public view (a dict without the key's hash or the
user's callback secret); a new key itself is returned once, beside its view.
"""

from __future__ import annotations

from datetime import datetime

from serve_app.auth.key_store import KeyStore


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def user_view(doc: dict) -> dict:
    return {
        "name": doc["_id"],
        "description": doc.get("description"),
        "created_at": _iso(doc["created_at"]) or "",
        "disabled": bool(doc.get("disabled")),
        "disabled_at": _iso(doc.get("disabled_at")),
    }


def key_view(doc: dict) -> dict:
    return {
        "id": doc["_id"],
        "prefix": doc["prefix"],
        "owner": doc["owner"],
        "name": doc.get("name"),
        "scopes": doc["scopes"],
        "created_at": _iso(doc["created_at"]) or "",
        "last_used_at": _iso(doc.get("last_used_at")),
        "expires_at": _iso(doc.get("expires_at")),
        "revoked": doc["revoked"],
        "revoked_at": _iso(doc.get("revoked_at")),
        "rate_limit_per_s": doc.get("rate_per_s"),
        "burst": doc.get("burst"),
        "max_concurrent_jobs": doc.get("max_jobs"),
        "token_rate_per_s": doc.get("token_rate_per_s"),
        "token_burst": doc.get("token_burst"),
        "max_inflight_tokens": doc.get("max_inflight_tokens"),
    }


class Accounts:
    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    async def create_user(self, name: str, description: str | None) -> dict:
        return user_view(await self.keys.create_user(name, description))

    async def list_users(self) -> list[dict]:
        return [user_view(d) for d in await self.keys.list_users()]

    async def disable_user(self, name: str) -> dict:
        """Disable a user and revoke every key it has (their sessions end too)."""
        return user_view(await self.keys.disable_user(name))

    async def create_key(self, owner: str, **options: object) -> tuple[str, dict]:
        """(the key, shown only now; its view)."""
        key, doc = await self.keys.create_key(owner, **options)
        return key, key_view(doc)

    async def list_keys(self, owner: str | None = None) -> list[dict]:
        return [key_view(d) for d in await self.keys.list_keys(owner)]

    async def get_key(self, key_id: str) -> dict:
        return key_view(await self.keys.get_key(key_id))

    async def revoke_key(self, key_id: str) -> dict:
        return key_view(await self.keys.revoke_key(key_id))

    async def rotate_key(self, key_id: str, grace_s: float) -> tuple[str, dict, dict]:
        """(the new key, shown only now; its view; the old key's view)."""
        key, new, old = await self.keys.rotate_key(key_id, grace_s)
        return key, key_view(new), key_view(old)
