"""Plain helpers of the integration tests (fixtures live in conftest.py)."""

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
