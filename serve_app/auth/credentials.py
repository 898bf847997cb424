"""The credential format, the caller it stands for (Principal), and the vocabularies they use.

Credentials are random and carry the id of their key, so a key can be named in logs and
lists without its secret:

    ik_<key id>_<secret>   an API key (shown once, at creation; MongoDB keeps its SHA-256)
    is_<key id>_<secret>   a session token from POST /v1/auth/login (kept in Redis only)

Where Redis keeps what is known about a credential is named here too, once, for every module
that reads or drops those entries.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from serve_app.errors import AuthenticationError, PermissionDeniedError

# What a key may do: the one definition (the HTTP schemas and the admin CLI use these).
Scope = Literal["infer", "jobs", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)
# A user (tenant) name: also a MongoDB _id and an S3 key prefix.
USER_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"

KEY_PREFIX = "ik"
SESSION_PREFIX = "is"
_CREDENTIAL = re.compile(r"^(ik|is)_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


def digest(credential: str) -> str:
    """What is stored and looked up instead of a credential: its SHA-256 (credentials are random)."""
    return hashlib.sha256(credential.encode()).hexdigest()


def new_credential(prefix: str, key_id: str) -> str:
    return f"{prefix}_{key_id}_{secrets.token_urlsafe(32)}"


# -- where Redis keeps a credential's lookups --------------------------------------------------


def auth_key(sha: str) -> str:
    """A key's cached lookup (its Principal, or "!reason" for a refusal)."""
    return f"auth:{sha}"


def fallback_key(sha: str) -> str:
    """The last good (or refused) lookup of a key, read only while MongoDB fails."""
    return f"authlast:{sha}"


def deny_key(key_id: str) -> str:
    """A revoked key, refused while this exists: set by every revocation (outliving every cached copy
    of the key), and with no expiry by a revocation MongoDB could not record."""
    return f"revoked:{key_id}"


def session_key(sha: str) -> str:
    return f"session:{sha}"


def sessions_key(key_id: str) -> str:
    """The set of a key's sessions (their hashes), so revoking the key ends them."""
    return f"sessions:{key_id}"


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
        return auth_key(self.sha) if self.kind == "key" else session_key(self.sha)


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


_PRINCIPAL_FIELDS = set(Principal.__dataclass_fields__)
