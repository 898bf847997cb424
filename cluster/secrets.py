"""Credentials of the local cluster, generated once into <state_dir>/secrets/ (0700, files 0600).

Each file is named after the setting it fills (`infer_redis_password` for INFER_REDIS_PASSWORD),
so pydantic-settings reads them as a secrets directory (serve_app.settings.load_settings); an
environment variable still wins over a file. `ray-token` is Ray's token (RAY_AUTH_TOKEN_PATH);
`grafana-admin-password` is read by Grafana only (cluster/compose.yaml, profile monitoring).
A file that exists is never rewritten: the services' data directories hold users made with it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cluster.settings import ClusterSettings, get_cluster_settings, load_cluster_settings

RAY_TOKEN_FILE = "ray-token"
GRAFANA_PASSWORD_FILE = "grafana-admin-password"

# setting -> how to make a value of it
GENERATED = {
    "infer_redis_password": lambda: secrets.token_urlsafe(32),
    "infer_mongo_password": lambda: secrets.token_urlsafe(32),
    "infer_rabbitmq_password": lambda: secrets.token_urlsafe(32),
    "infer_s3_access_key": lambda: "AK" + secrets.token_hex(9).upper(),
    "infer_s3_secret_key": lambda: secrets.token_urlsafe(30),
    RAY_TOKEN_FILE: lambda: secrets.token_hex(32),
    GRAFANA_PASSWORD_FILE: lambda: secrets.token_urlsafe(24),
}


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (0600), replacing any older file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_secrets(state_dir: Path) -> list[str]:
    """Make every missing secret file; returns the names made. The state dir itself is 0700."""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    directory = state_dir / "secrets"
    directory.mkdir(exist_ok=True)
    os.chmod(directory, 0o700)
    made = []
    for name, make in GENERATED.items():
        path = directory / name
        if not path.exists():
            write_private(path, make().encode())
            made.append(name)
    return made


def ray_token_file(settings: ClusterSettings) -> Path:
    return settings.secrets_dir / RAY_TOKEN_FILE


def ray_auth_env(settings: ClusterSettings) -> dict[str, str]:
    """What every Ray process, CLI call and client needs: token authentication, and where the token is."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_file(settings))}


def ray_auth_headers(settings: ClusterSettings) -> dict[str, str]:
    """For HTTP calls to the dashboard's API."""
    token = ray_token_file(settings).read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def prepared_settings() -> ClusterSettings:
    """Settings after the local secrets exist, with Ray's auth exported to this process (its clients)."""
    from serve_app.settings import get_settings

    state_dir = load_cluster_settings().state_dir
    ensure_secrets(state_dir)
    get_settings.cache_clear()  # the gateway's settings in this process (tests build gateways) see them too
    get_cluster_settings.cache_clear()
    settings = get_cluster_settings()
    os.environ.update(ray_auth_env(settings))
    return settings
