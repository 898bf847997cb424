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


def listener_pid(port: int) -> int | None:
    """The process listening on a TCP port of this machine (a Serve proxy, say), if any."""
    listing = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"pid=(\d+)", listing)
    return int(match.group(1)) if match else None
