"""Plain helpers of the integration tests (fixtures live in conftest.py)."""

import json
import re
import subprocess
import time
import uuid

MODEL = "all-minilm-l6-v2"
TERMINAL = {"succeeded", "failed", "cancelled"}


def texts(n: int, tag: str = "job") -> list[str]:
    run = uuid.uuid4().hex[:10]
    return [f"{tag} {run} text number {i} about serving models at scale" for i in range(n)]


def submit(api, **body):
    return api.post("/v1/jobs", json={"model": MODEL, **body})


def wait_for(api, job_id: str, done=lambda job: job["status"] in TERMINAL, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} {job['progress']} after {timeout_s}s")
        time.sleep(0.2)


def job_diagnosis(settings, job_id: str) -> str:
    """What a stuck job's state looks like from every side, for a failure message: its document, the
    queues, the JobWorker and EmbeddingModel replicas, and the replica log lines that name it."""
    from pathlib import Path

    from pymongo import MongoClient

    from cluster.nodes import serve_details
    from cluster.services import Ray
    from serve_app.infra.rabbitmq import queue_depths

    parts = []
    try:
        with MongoClient(settings.mongo_url, **settings.mongo_options()) as client:
            doc = client[settings.mongo_db]["jobs"].find_one(
                {"_id": job_id}, {"status": 1, "attempts": 1, "lease": 1, "worker": 1, "last_error": 1, "progress": 1}
            )
        parts.append(f"job: {doc}")
    except Exception as exc:  # a diagnosis never hides the failure it explains
        parts.append(f"job: unread ({exc!r})")
    try:
        for queue, (ready, consumers) in queue_depths(settings).items():
            parts.append(f"queue {queue}: {ready} ready, {consumers} consumers")
    except Exception as exc:
        parts.append(f"queues: unread ({exc!r})")
    try:
        deployments = serve_details(settings)["applications"][settings.serve_app_name]["deployments"]
        for name in ("JobWorker", "EmbeddingModel"):
            replicas = [(r.get("state"), r.get("pid"), r.get("node_ip")) for r in deployments[name]["replicas"]]
            parts.append(f"{name} replicas: {replicas}")
    except Exception as exc:
        parts.append(f"replicas: unread ({exc!r})")
    logs = Path(Ray("ray", settings).temp_dir) / "session_latest" / "logs" / "serve"
    for log in sorted(logs.glob("replica_*JobWorker*.log")) + sorted(logs.glob("replica_*EmbeddingModel*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError as exc:
            parts.append(f"{log.name}: unread ({exc!r})")
            continue
        named = [line for line in lines if job_id in line][-5:]
        errors = [line for line in lines if '"levelname": "ERROR"' in line or '"levelname": "WARNING"' in line][-5:]
        if named or errors:
            parts.append(f"{log.name}:\n  " + "\n  ".join(json.dumps(line)[1:-1] for line in named + errors))
    return "\n".join(parts)


def listener_pid(port: int, *, namespace: str | None = None, host: str | None = None) -> int | None:
    """The process listening on a TCP port of this machine (a Serve proxy, say), if any; in a network
    namespace (a worker node's, in the netns layout) and on one address (`host`) when given."""
    argv = ["ss", "-ltnpH", f"sport = :{port}"]
    if namespace:
        argv = ["ip", "netns", "exec", namespace, *argv]
    listing = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        fields = line.split()
        if host is not None and fields[3].rsplit(":", 1)[0].strip("[]") != host:
            continue
        if match := re.search(r"pid=(\d+)", line):
            return int(match.group(1))
    return None


def nginx_servers(settings) -> list[str]:
    """host:port of every server in NGINX's upstream block (a backup's too)."""
    config = (settings.state_dir / "nginx" / "nginx.conf").read_text()
    return re.findall(r"server (\S+)", re.search(r"upstream serve_proxies \{(.*?)\}", config, re.S).group(1))


def record_figures(settings, key: str, figures: dict) -> None:
    """Add one fault's figures to <state_dir>/multinode-figures.json (the README's multi-node table)."""
    path = settings.state_dir / "multinode-figures.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded[key] = figures
    path.write_text(json.dumps(recorded, indent=2))
    print(f"{key}: {figures}")
