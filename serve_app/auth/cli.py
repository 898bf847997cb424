"""Users and API keys from the command line, straight against MongoDB (and Redis, to drop revoked keys).

    python -m serve_app.admin users create alice [--description "..."]
    python -m serve_app.admin users list
    python -m serve_app.admin users disable alice          # and revoke all its keys
    python -m serve_app.admin users callback-secret alice  # make (or replace) the secret signing its callbacks
    python -m serve_app.admin keys create alice [--scopes infer,jobs] [--name ci] [--expires-in-days 90]
                                          [--rate 50] [--burst 100] [--max-jobs 4]
                                          [--token-rate 2000] [--token-burst 65536] [--max-inflight-tokens 512]
    python -m serve_app.admin keys list [--owner alice]
    python -m serve_app.admin keys revoke <key id>      # MongoDB down: denied via Redis, exits 1; run again later
    python -m serve_app.admin keys rotate <key id> [--grace-s 3600]

A key, and a callback secret, is printed once, when it is made. The same operations are HTTP endpoints under /v1/admin
for keys with the `admin` scope.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta

from serve_app.auth.credentials import SCOPES
from serve_app.auth.key_store import open_key_store
from serve_app.errors import APIError
from serve_app.settings import Settings, get_settings


def _row(doc: dict) -> dict:
    """A stored document for printing: dates as ISO strings, never a hash, never a callback secret."""
    out = {k: v for k, v in doc.items() if k not in ("hash", "callback_secret")}
    if doc.get("callback_secret"):
        out["callback_secret_created_at"] = doc["callback_secret"].get("created_at")
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in out.items()}


async def _run(args: argparse.Namespace, settings: Settings) -> object:
    async with open_key_store(settings) as store:
        await store.ensure_indexes()
        if args.what == "users":
            if args.action == "create":
                return _row(await store.create_user(args.name, args.description))
            if args.action == "list":
                return [_row(d) for d in await store.list_users()]
            if args.action == "callback-secret":
                made = await store.rotate_callback_secret(args.name)
                return {"user": args.name, "secret": made["value"], "created_at": made["created_at"].isoformat()}
            return _row(await store.disable_user(args.name))
        if args.action == "create":
            key, doc = await store.create_key(
                args.owner,
                name=args.name,
                scopes=[s.strip() for s in args.scopes.split(",") if s.strip()],
                expires_at=datetime.now(UTC) + timedelta(days=args.expires_in_days) if args.expires_in_days else None,
                rate_per_s=args.rate,
                burst=args.burst,
                max_jobs=args.max_jobs,
                token_rate_per_s=args.token_rate,
                token_burst=args.token_burst,
                max_inflight_tokens=args.max_inflight_tokens,
            )
            return {"key": key, **_row(doc)}
        if args.action == "list":
            return [_row(d) for d in await store.list_keys(args.owner)]
        if args.action == "revoke":
            return _row(await store.revoke_key(args.key_id))
        key, new, old = await store.rotate_key(args.key_id, args.grace_s)
        return {"key": key, "new": _row(new), "old": _row(old)}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m serve_app.admin", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = root.add_subparsers(dest="what", required=True)
    users = what.add_parser("users").add_subparsers(dest="action", required=True)
    create = users.add_parser("create")
    create.add_argument("name")
    create.add_argument("--description")
    users.add_parser("list")
    users.add_parser("disable").add_argument("name")
    users.add_parser(
        "callback-secret", help="make a new secret signing the user's callbacks, replacing any; printed once"
    ).add_argument("name")
    keys = what.add_parser("keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create")
    create.add_argument("owner")
    create.add_argument("--name")
    create.add_argument("--scopes", default="infer,jobs", help=f"comma-separated, of {', '.join(SCOPES)}")
    create.add_argument("--expires-in-days", type=float)
    create.add_argument("--rate", type=float, help="requests/s (0: unlimited; default: the setting)")
    create.add_argument("--burst", type=int)
    create.add_argument("--max-jobs", type=int, help="concurrent jobs (0: unlimited; default: the setting)")
    create.add_argument("--token-rate", type=float, help="work budget, estimated tokens/s (0: unlimited)")
    create.add_argument("--token-burst", type=int, help="work bucket size, estimated tokens")
    create.add_argument("--max-inflight-tokens", type=int, help="estimated tokens at the model at once (0: unlimited)")
    keys.add_parser("list").add_argument("--owner")
    keys.add_parser("revoke").add_argument("key_id")
    rotate = keys.add_parser("rotate")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-s", type=float, default=3600.0, help="the old key works this long (0: revoke now)")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = asyncio.run(_run(args, get_settings()))
    except APIError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
