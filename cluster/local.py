"""The local bring-up: every service as a plain process, the model seeded, the app deployed.

python -m cluster up       # start what is not running, deploy, wait until ready, print URLs
python -m cluster down     # stop what `up` started (by pid), leave the rest
python -m cluster status   # each component: who runs it and whether it answers; every node
python -m cluster nodes    # every Ray node: its proxy and the replicas on it
python -m cluster sync-nginx  # keep NGINX's upstreams equal to Serve's live proxies (run by `up`)
python -m cluster models ...  # the model repository: push, list, show, delete (cluster/models.py)

WORKERS: INFER_WORKERS=N (make up WORKERS=N) runs N Ray worker nodes next to the head.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import yaml

from cluster import netns
from cluster.dev_key import ensure_dev_key
from cluster.nodes import (
    NginxSync,
    layout,
    node_ids,
    recorded_workers,
    serve_details,
    sync_nginx_forever,
    workers,
)
from cluster.processes import wait_until
from cluster.secrets import prepared_settings, ray_token_file
from cluster.seed import seed_default_model
from cluster.services import VENV_BIN, Ray, ServiceError, all_services, load_serve_config, ray_env
from cluster.settings import ClusterSettings, get_cluster_settings


def _say(message: str) -> None:
    print(message, flush=True)


CODE_DIRS = ("serve_app", "deployments")
CHECKOUT = Path(__file__).resolve().parent.parent


def code_digest(root: Path = CHECKOUT) -> str:
    """A hash of the application's code (every .py file the replicas import from this checkout)."""
    digest = hashlib.sha256()
    for directory in CODE_DIRS:
        for path in sorted((root / directory).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def with_code_digest(config: dict, digest: str) -> dict:
    """Every application and deployment carries the code's digest in its environment: Serve redeploys a
    config only where it changed, so without this an edited checkout would keep running the old code.
    The application's own runtime_env matters too: Serve builds the application (imports build_app and
    pickles the deployment classes) in a worker of that environment, and a worker kept from an earlier
    deploy holds the modules it imported then."""
    for app in config.get("applications", []):
        app.setdefault("runtime_env", {}).setdefault("env_vars", {})["INFER_CODE_DIGEST"] = digest
        for deployment in app.get("deployments", []):
            options = deployment.setdefault("ray_actor_options", {})
            options.setdefault("runtime_env", {}).setdefault("env_vars", {})["INFER_CODE_DIGEST"] = digest
    return config


def deploy(settings: ClusterSettings, config: dict | None = None) -> Path:
    """`serve deploy` a Serve config (default: cluster/serve_config.yaml with this machine's settings),
    stamped with the code's digest, so that changed code is rolled out like a changed config."""
    rendered = settings.state_dir / "serve_config.yaml"
    if config is None:
        nodes, node_set = _nodes(settings)
        config = load_serve_config(settings, nodes=nodes, node_set=node_set)
    config = with_code_digest(copy.deepcopy(config), code_digest())
    rendered.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run(
        [str(VENV_BIN / "serve"), "deploy", str(rendered), "--address", settings.dashboard_url],
        env=ray_env(settings),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ServiceError(f"serve deploy failed:\n{result.stdout}\n{result.stderr}")
    return rendered


def tls_context(settings: ClusterSettings) -> ssl.SSLContext:
    """A client context that trusts the local CA (or, with real certificates, the system's)."""
    local_ca = settings.tls_cert_file is None and settings.tls_ca_file.exists()
    return ssl.create_default_context(cafile=settings.tls_ca_file if local_ca else None)


def readiness(settings: ClusterSettings, base_url: str | None = None) -> dict | None:
    try:
        url = f"{base_url or settings.public_url}/readyz"
        with urllib.request.urlopen(url, timeout=5, context=tls_context(settings)) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def serve_settled(settings: ClusterSettings) -> tuple[bool, str]:
    """Whether Serve runs the application with every deployment HEALTHY (all its replicas started), and what
    it says. /readyz answers once one replica of each model does; the others may still be loading."""
    try:
        application = serve_details(settings)["applications"][settings.serve_app_name]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"Serve's state unread ({exc!r})"
    waiting = {
        name: deployment.get("status")
        for name, deployment in (application.get("deployments") or {}).items()
        if not _settled(deployment)
    }
    return application.get("status") == "RUNNING" and not waiting, f"{application.get('status')}, waiting: {waiting}"


def _settled(deployment: dict) -> bool:
    """HEALTHY, or scaling because its autoscaler asked (a deployment that waits for CPUs to scale up, or a
    node lost, must not hold `make up` forever); a config update still under way is not settled."""
    status = deployment.get("status")
    return status == "HEALTHY" or (
        status in ("UPSCALING", "DOWNSCALING") and deployment.get("status_trigger") == "AUTOSCALING"
    )


def wait_ready(settings: ClusterSettings) -> dict:
    """The API answers ready, and every replica of every deployment has started (so the first minutes after
    `make up` are not spent loading models beside the first requests)."""
    report: dict | None = None
    serve = ""

    def ready() -> bool:
        nonlocal report, serve
        report = readiness(settings)
        if report is None or report.get("status") != "ready":
            return False
        settled, serve = serve_settled(settings)
        return settled

    if not wait_until(ready, settings.ready_timeout_s, interval_s=1.0):
        raise ServiceError(
            f"the API at {settings.public_url}/readyz was not ready within {settings.ready_timeout_s:g}s; "
            f"last report: {json.dumps(report)}; Serve: {serve or 'not asked'}; "
            f"see `make status` and {settings.state_dir}/logs"
        )
    return report or {}


def up(settings: ClusterSettings | None = None) -> list[str]:
    """Bring everything up; returns the names of the services this call started."""
    settings = settings or get_cluster_settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    if settings.netns_layout:  # the node network first: the stores and Ray's head listen on it too
        netns.ensure_bridge(settings.node_subnet)
        netns.guard_ports(settings.unguarded_ray_ports())
        network = f"{netns.BRIDGE} {settings.bridge_address}/{settings.node_subnet.prefixlen}"
        _say(f"  {'node network':<13} {'ready':<9} {network}")
    order = _in_order(settings)
    started = []
    for service in order:
        began = time.monotonic()
        outcome = service.ensure()
        if outcome == "started":
            started.append(service.name)
        _say(f"  {service.name:<13} {outcome:<9} {service.address:<22} ({time.monotonic() - began:.1f}s)")
        if service.name == "object_store":
            manifest = seed_default_model(settings)
            _say(
                f"  {'model':<13} {'seeded':<9} {settings.model_bucket}/{manifest.name}/{manifest.version} "
                f"({len(manifest.files)} files)"
            )
        if isinstance(service, Ray) and not service.name.startswith("ray-worker-"):
            for extra in _surplus_workers(settings):
                if extra.stop():
                    _say(f"  {extra.name:<13} stopped   (WORKERS={settings.workers})")
        if service.name == _last_ray(settings):
            deploy(settings)
            _say(f"  {'serve':<13} deployed  {settings.serve_url}")
    began = time.monotonic()
    wait_ready(settings)
    _say(f"  {'api':<13} ready     {settings.public_url} ({time.monotonic() - began:.1f}s)")
    key, made = asyncio.run(ensure_dev_key(settings))
    if key is None:
        _say(f"  {'api key':<13} none      user {settings.dev_owner} is disabled; make keys with serve_app.admin")
    else:
        state = "created" if made else "kept"
        _say(f"  {'api key':<13} {state:<9} {_shown(settings.dev_key_file)} (user {settings.dev_owner})")
    return started


def _shown(path: Path) -> str:
    """A path as the person who typed `make up` can use it: relative to where they are, when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _nodes(settings: ClusterSettings) -> tuple[int, str]:
    """How many nodes Ray has alive, and a digest of their ids (it changes when a node joins, leaves or
    comes back as a new node); when Ray does not answer, the nodes the bring-up runs and no digest."""
    try:
        ids = node_ids(settings)
    except (OSError, ValueError):
        return 1 + _worker_count(settings), ""
    return len(ids), hashlib.sha256(",".join(ids).encode()).hexdigest()[:12]


def _worker_count(settings: ClusterSettings) -> int:
    """WORKERS when given; else as many worker nodes as are running now."""
    if settings.workers is not None:
        return settings.workers
    return max((w.index for w in recorded_workers(settings) if w.process.running), default=0)


def _surplus_workers(settings: ClusterSettings) -> list:
    count = _worker_count(settings)
    return [w for w in recorded_workers(settings) if w.index > count]


def _last_ray(settings: ClusterSettings) -> str:
    count = _worker_count(settings)
    return f"ray-worker-{count}" if count else "ray"


def _in_order(settings: ClusterSettings) -> list:
    """Every service in start order: the stateful ones, Ray's head, its workers, NGINX and its sync."""
    services = all_services(settings)
    at = next(i for i, s in enumerate(services) if isinstance(s, Ray)) + 1
    extra = workers(settings, _worker_count(settings))
    return [*services[:at], *extra, *services[at:], NginxSync("nginx-sync", settings)]


def down(settings: ClusterSettings | None = None, only: list[str] | None = None) -> list[str]:
    """Stop the services this bring-up started (all of ours, or just those named)."""
    settings = settings or get_cluster_settings()
    stopped = []
    everything = _in_order(settings)
    head = next(i for i, s in enumerate(everything) if isinstance(s, Ray)) + 1
    everything[head:head] = [w for w in recorded_workers(settings) if w.name not in {s.name for s in everything}]
    for service in reversed(everything):
        if only is not None and service.name not in only:
            continue
        if service.stop():
            stopped.append(service.name)
            _say(f"  {service.name:<13} stopped")
    if settings.netns_layout and not any(service.process.running for service in everything):
        # The node network goes with the last of ours; a namespace still holding a process stays.
        for name in netns.namespaces():
            netns.remove_namespace(name)
        netns.remove_bridge()
        netns.remove_guard()
    return stopped


def status(settings: ClusterSettings | None = None) -> list[dict]:
    settings = settings or get_cluster_settings()
    rows = []
    for service in _in_order(settings):
        pid = service.process.pid
        answers = service.answers()
        owner = f"pid {pid}" if pid else ("external" if answers else "-")
        rows.append({"name": service.name, "owner": owner, "answers": answers, "address": service.address})
    report = readiness(settings)
    rows.append(
        {
            "name": "api",
            "owner": "serve",
            "answers": bool(report and report.get("status") != "unavailable"),
            "address": settings.public_url,
            "detail": report,
        }
    )
    return rows


def banner(settings: ClusterSettings) -> str:
    body = json.dumps({"model": settings.default_model, "input": ["Ray Serve scales replicas", "Serving at scale"]})
    https = ""
    if settings.https_url:
        ca = f" --cacert {settings.tls_ca_file}" if settings.tls_cert_file is None else ""
        https = f"\n  HTTPS          {settings.https_url}   (curl{ca})"
    door = (
        f"the gateway replicas' own ports; Serve proxy {settings.serve_url} the backup"
        if settings.serve_direct_ingress
        else f"Serve proxy {settings.serve_url}"
    )
    return f"""
The cluster is up.
  API            {settings.public_url}   (NGINX -> {door}){https}
  API docs       {settings.public_url}/docs
  Ray dashboard  {settings.dashboard_url}   (loopback only; it asks for Ray's token, below)
  Prometheus     {settings.prometheus_url}   (loopback only; Ray's, Serve's, this project's and RabbitMQ's metrics)
  API key        {settings.dev_key_file}   (user {settings.dev_owner}; scopes infer, jobs, admin)
  Ray token      {ray_token_file(settings)}   (ray/serve CLI: see below)
  Store secrets  {settings.secrets_dir}/   (0600; read by the cluster's settings)
  State and logs {settings.state_dir}

Try it:
  curl -s {settings.public_url}/v1/embeddings \\
    -H "Authorization: Bearer $(cat {settings.dev_key_file})" \\
    -H 'Content-Type: application/json' \\
    -d '{body}'

The ray and serve commands in a shell of yours:
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={ray_token_file(settings)}
  .venv/bin/serve status --address {settings.dashboard_url}

More keys and users: python -m serve_app.admin --help (or /v1/admin/* with this key).
Stop it with `make down`; see each component with `make status`.
"""


def _say_nodes(settings: ClusterSettings, details: dict | None = None) -> None:
    try:
        rows = layout(settings, details)
    except (OSError, ValueError):
        _say("  nodes: Ray does not answer")
        return
    _say("  nodes:")
    for row in rows:
        proxy = f"{row['proxy']} {row['proxy_status']}" if row["proxy"] else "none"
        doors = ", ".join(row["doors"]) or "none"
        replicas = ", ".join(row["replicas"]) or "-"
        _say(f"    {row['node']:<9} {row['node_id']}  proxy {proxy:<24} NGINX -> {doors:<19} {replicas}")


def deployments(settings: ClusterSettings, details: dict | None = None) -> list[dict]:
    """Each deployment of the app: its status, the replicas it aims for (or its autoscaling bounds), and
    how many replicas are in each state."""
    details = serve_details(settings) if details is None else details
    app = (details.get("applications") or {}).get(settings.serve_app_name) or {}
    rows = []
    for name, deployment in (app.get("deployments") or {}).items():
        scaling = (deployment.get("deployment_config") or {}).get("autoscaling_config")
        states = Counter(replica.get("state", "?") for replica in deployment.get("replicas") or [])
        rows.append(
            {
                "name": name,
                "status": deployment.get("status"),
                "target": deployment.get("target_num_replicas"),
                "bounds": f"{scaling['min_replicas']}-{scaling['max_replicas']}" if scaling else None,
                "replicas": dict(states),
            }
        )
    return rows


def _say_detail(settings: ClusterSettings, details: dict | None = None) -> None:
    """Deployments and their replicas, the job queues, and where to look (URLs, logs)."""
    from serve_app.infra.rabbitmq import queue_depths

    try:
        rows = deployments(settings, details)
        _say(f"  deployments ({settings.serve_app_name}):")
        for row in rows:
            target = f"target {row['target']}" + (f" (autoscaling {row['bounds']})" if row["bounds"] else "")
            states = ", ".join(f"{n} {state}" for state, n in sorted(row["replicas"].items())) or "no replicas"
            _say(f"    {row['name']:<15} {row['status'] or '?':<12} {target:<27} {states}")
    except (OSError, ValueError):
        _say("  deployments: Serve does not answer")
    try:
        _say("  job queues:")
        for queue, (ready, consumers) in queue_depths(settings).items():
            _say(f"    {queue:<15} {ready} ready, {consumers} consumers")
    except Exception as exc:  # pika's errors and OSError alike: status reports, it does not fail
        _say(f"    unread: {type(exc).__name__}: {exc}")
    ray_logs = Ray("ray", settings).temp_dir / "session_latest" / "logs"
    _say("  where to look:")
    _say(f"    API            {settings.public_url}   (docs: {settings.public_url}/docs)")
    _say(f"    Ray dashboard  {settings.dashboard_url}")
    _say(f"    Prometheus     {settings.prometheus_url}")
    _say(f"    service logs   {settings.state_dir / 'logs'}/<service>.log")
    _say(f"    NGINX          {settings.state_dir / 'nginx' / 'logs'}/access.log (JSON, with request_id)")
    _say(f"    Serve          {ray_logs / 'serve'}/ (controller, proxy, replica_<app>_<deployment>_*.log)")


def main(argv: list[str] | None = None) -> int:
    argv = argv or sys.argv[1:] or ["status"]
    command = argv[0]
    settings = prepared_settings()
    if command == "models":
        from cluster.models import main as models

        return models(argv[1:], settings)
    try:
        if command == "up":
            _say(f"Bringing the cluster up (state in {settings.state_dir}):")
            up(settings)
            _say(banner(settings))
        elif command == "down":
            stopped = down(settings)
            _say("stopped: " + (", ".join(stopped) if stopped else "nothing of ours was running"))
        elif command == "status":
            rows = status(settings)
            for row in rows:
                mark = "up  " if row["answers"] else "DOWN"
                _say(f"  {mark} {row['name']:<13} {row['owner']:<12} {row['address']}")
            detail = rows[-1].get("detail")
            if detail:
                for name, component in detail.get("components", {}).items():
                    _say(f"       {name:<24} {component['status']:<5} {component.get('detail') or ''}")
            try:  # Serve's state, read once for the nodes and the deployments
                details = serve_details(settings)
            except (OSError, ValueError):
                details = None  # each part then says Serve does not answer
            _say_nodes(settings, details)
            _say_detail(settings, details)
            return 0 if all(r["answers"] for r in rows) else 1
        elif command == "nodes":
            _say_nodes(settings)
        elif command == "sync-nginx":
            sync_nginx_forever(settings)
        elif command == "deploy":
            deploy(settings)
            wait_ready(settings)
            _say(f"deployed; ready at {settings.public_url}")
        else:
            _say(__doc__ or "")
            return 2
    except ServiceError as exc:
        _say(f"error: {exc}")
        return 1
    return 0
