"""More than one Ray node on this machine: a worker node joins, takes replicas behind its own proxy
with weights it pulled itself, is lost under load, and joins again (`make up WORKERS=1`).

The figures (requests failed at the loss, seconds to full strength, seconds to join and serve) are
written to <state_dir>/multinode-figures.json for the README's multi-node section.
"""

import contextlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest

from cluster import local
from cluster.nodes import layout, serve_details, workers
from cluster.processes import descendants, wait_until
from serve_app.model_repository import VERIFIED_MARKER
from tests.integration.helpers import listener_pid

MODEL = "all-minilm-l6-v2"
CLIENTS = 8


def head_proxy(settings) -> str:
    return f"{settings.serve_host}:{settings.serve_port}"


def worker_proxy(settings) -> str:
    return f"{settings.serve_host}:{settings.worker_proxy_port_base + 1}"


def settled(settings) -> bool:
    """Every application RUNNING: no deployment or rolling restart under way."""
    apps = serve_details(settings).get("applications") or {}
    return bool(apps) and all(app.get("status") == "RUNNING" for app in apps.values())


def running(settings, node: str) -> list[str]:
    """The replicas running on a node ("head", "worker-1"), by deployment name."""
    return next((row["replicas"] for row in layout(settings) if row["node"] == node), [])


def with_workers(settings, count: int):
    return settings.model_copy(update={"workers": count})


def upstreams(settings) -> str:
    return (settings.state_dir / "nginx" / "nginx.conf").read_text()


def served_by(settings, request_ids: set[str]) -> list[str]:
    """Which proxy answered each of these requests, from NGINX's access log (the last upstream tried)."""
    log = settings.state_dir / "nginx" / "logs" / "access.log"
    found = {}
    for line in log.read_text(errors="replace").split("\n"):
        if '"request_id":"multinode-' not in line:
            continue  # the log holds every test's requests, fuzzed paths included
        entry = json.loads(line)
        if entry["request_id"] in request_ids:
            found[entry["request_id"]] = entry["upstream"].split(",")[-1].strip()
    return list(found.values())


def serving_on_two_nodes(settings) -> bool:
    """The app is RUNNING (no rolling restart under way) with the model on both nodes and a gateway and
    a proxy on the worker, which NGINX balances to."""
    worker = running(settings, "worker-1")
    return (
        settled(settings)
        and "EmbeddingModel" in running(settings, "head")
        and {"EmbeddingModel", "Gateway"} <= set(worker)
        and worker_proxy(settings) in upstreams(settings)
    )


def back_on_one_node(settings) -> bool:
    head = running(settings, "head")
    return (
        settled(settings)
        and not running(settings, "worker-1")
        and head.count("Gateway") == 1
        and head.count("EmbeddingModel") >= 2
        and worker_proxy(settings) not in upstreams(settings)
    )


@pytest.fixture(scope="module")
def worker(settings):
    """Worker node 1 joined as `make up WORKERS=1` does (its weight cache empty first); afterwards the
    cluster goes back to one node unless the worker was running before this module."""
    node = workers(settings, 1)[0]
    was_running = node.process.running
    if not was_running:
        shutil.rmtree(node.cache_dir, ignore_errors=True)
    # None: the node ran before this module, with whatever its cache held.
    cache_was_empty = None if was_running else not node.cache_dir.exists() or not any(node.cache_dir.iterdir())
    local.up(with_workers(settings, 1))
    assert wait_until(lambda: serving_on_two_nodes(settings), 240, interval_s=1), layout(settings)
    yield node, cache_was_empty
    if not was_running:  # the later tests run on one node again, once its rolling restart is over
        local.up(with_workers(settings, 0))
        assert wait_until(lambda: back_on_one_node(settings), 240, interval_s=1), layout(settings)


def test_a_worker_node_serves_through_its_own_proxy_with_weights_it_pulled(settings, api, worker):
    node, cache_was_empty = worker
    assert cache_was_empty is not False, "the worker's weight cache was not empty before it joined"
    verified = list(node.cache_dir.rglob(VERIFIED_MARKER))
    assert verified, f"no verified model under {node.cache_dir}"
    assert (verified[0].parent / "model.safetensors").stat().st_size > 1_000_000
    assert "EmbeddingModel" in running(settings, "head"), "one node's loss must not take every replica"

    ids = set()
    for i in range(40):
        request_id = f"multinode-{uuid.uuid4().hex}"
        ids.add(request_id)
        answer = api.post(
            "/v1/embeddings",
            json={"model": MODEL, "input": f"which node serves request {i}"},
            headers={"X-Request-ID": request_id},
        )
        assert answer.status_code == 200, answer.text
    assert wait_until(lambda: len(served_by(settings, ids)) == len(ids), 10)  # NGINX flushes its log every second
    proxies = served_by(settings, ids)
    assert {head_proxy(settings), worker_proxy(settings)} <= set(proxies), f"requests reached only {set(proxies)}"


@dataclass
class Outcome:
    started: float
    ended: float
    status: int


class Load:
    """CLIENTS threads through NGINX, alternating single texts and batches of 16, never cached."""

    def __init__(self, settings, auth_headers) -> None:
        self.settings, self.headers = settings, auth_headers
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def client(self, index: int) -> None:
        with httpx.Client(base_url=self.settings.public_url, headers=self.headers, timeout=120) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                count = 16 if n % 2 else 1
                texts = [f"load {index} {n} {k} {uuid.uuid4().hex[:8]}" for k in range(count)]
                started = time.monotonic()
                try:
                    status = http.post("/v1/embeddings", json={"model": MODEL, "input": texts}).status_code
                except httpx.HTTPError:
                    status = 0
                self.outcomes.append(Outcome(started, time.monotonic(), status))

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=130)


def kill_node(pid: int) -> None:
    """What a machine's loss looks like to the rest: every process of the node gone at once."""
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def test_losing_the_worker_nodes_proxy_under_load_costs_at_most_its_in_flight_requests(settings, auth_headers, worker):
    """NGINX retries embeddings on the head's proxy while Serve replaces the worker's."""
    port = settings.worker_proxy_port_base + 1
    before = listener_pid(port)
    assert before is not None
    with Load(settings, auth_headers) as load:
        time.sleep(4)
        killed_at = time.monotonic()
        os.kill(before, signal.SIGKILL)
        assert wait_until(lambda: listener_pid(port) not in (None, before), 60, interval_s=0.2)
        replaced = time.monotonic() - killed_at
        time.sleep(4)
    failed = [o for o in load.outcomes if o.status != 200]
    in_flight = [o for o in load.outcomes if o.started <= killed_at <= o.ended]
    figures = {
        "requests": len(load.outcomes),
        "failed": len(failed),
        "in_flight_at_loss": len(in_flight),
        "seconds_to_new_proxy": round(replaced, 1),
    }
    _record(settings, "proxy_loss_two_nodes", figures)
    assert len(failed) <= len(in_flight), figures
    assert wait_until(lambda: serving_on_two_nodes(settings), 120, interval_s=0.5), layout(settings)


def test_losing_the_worker_node_under_load_costs_at_most_its_in_flight_requests(settings, auth_headers, worker):
    node, _ = worker
    figures = {}
    with Load(settings, auth_headers) as load:
        time.sleep(8)
        killed_at = time.monotonic()
        kill_node(node.process.pid)

        def back_to_strength() -> bool:
            head = running(settings, "head")
            return (
                head.count("EmbeddingModel") >= 2 and head.count("Gateway") >= 2 and not running(settings, "worker-1")
            )

        assert wait_until(back_to_strength, 180, interval_s=0.5), layout(settings)
        figures["seconds_to_full_strength"] = round(time.monotonic() - killed_at, 1)
        time.sleep(8)
        after = time.monotonic()
    outcomes = load.outcomes
    failed = [o for o in outcomes if o.status != 200]
    in_flight = [o for o in outcomes if o.started <= killed_at <= o.ended]
    late = [o for o in failed if o.started > killed_at + 20]
    figures.update(
        requests=len(outcomes),
        failed=len(failed),
        failed_statuses=sorted({o.status for o in failed}),
        in_flight_at_loss=len(in_flight),
        last_failure_s_after_loss=round(max((o.ended - killed_at for o in failed), default=0), 1),
        succeeded_after_recovery=sum(1 for o in outcomes if o.started > after - 8 and o.status == 200),
    )
    _record(settings, "node_loss", figures)
    assert figures["succeeded_after_recovery"] > 0
    assert len(failed) <= len(in_flight), f"more failed than were in flight at the loss: {figures}"
    assert not late, f"requests still failed 20 s after the loss: {figures}"
    assert not [o for o in outcomes if o.started > after - 8 and o.status != 200], figures


@pytest.mark.usefixtures("worker")
def test_a_node_that_rejoins_takes_replicas_again(settings, api):
    started = time.monotonic()
    local.up(with_workers(settings, 1))
    joined = time.monotonic() - started
    assert wait_until(lambda: serving_on_two_nodes(settings), 240, interval_s=0.5), layout(settings)
    _record(
        settings,
        "rejoin",
        {"seconds_to_join": round(joined, 1), "seconds_to_serve": round(time.monotonic() - started, 1)},
    )
    answer = api.post("/v1/embeddings", json={"model": MODEL, "input": "after the rejoin"})
    assert answer.status_code == 200


def _record(settings, name: str, figures: dict) -> None:
    path = settings.state_dir / "multinode-figures.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    recorded[name] = figures
    path.write_text(json.dumps(recorded, indent=2))
    print(f"{name}: {figures}")
