"""The development key `make up` makes and prints: <state_dir>/api-key, every scope, default limits."""

from __future__ import annotations

from cluster.secrets import write_private
from cluster.settings import ClusterSettings
from serve_app.auth.credentials import SCOPES, Credential, digest
from serve_app.auth.key_store import open_key_store, refusal
from serve_app.errors import APIError


async def ensure_dev_key(settings: ClusterSettings) -> tuple[str | None, bool]:
    """The development key in <state_dir>/api-key: reused while it still works, else made anew.

    Returns (key, made); (None, False) if the user has been disabled. The key has every scope and
    the default limits, for the user `dev_owner`.
    """
    path = settings.dev_key_file
    async with open_key_store(settings) as store:
        await store.ensure_indexes()
        if path.exists():
            key = path.read_text().strip()
            try:
                credential = Credential.parse(key)
            except APIError:
                credential = None
            if credential is not None and refusal(await store.keys.find_one({"hash": digest(key)})) is None:
                return key, False
        try:
            await store.create_user(settings.dev_owner, "the local development user (make up)")
        except APIError as exc:
            if exc.status_code != 409:
                raise
        if (await store.get_user(settings.dev_owner)).get("disabled"):
            return None, False  # an administrator disabled it: not undone here
        key, _ = await store.create_key(settings.dev_owner, name="development key (make up)", scopes=SCOPES)
    write_private(path, f"{key}\n".encode())
    return key, True
