"""More than one Ray node on this machine: a worker node joins, takes replicas (a gateway NGINX sends
to directly, or its proxy without direct ingress) with weights it pulled itself, loses its door under
load, is lost under load, joins again (`make up WORKERS=1`), and (in the netns layout, where the worker
has a network namespace and an address of its own) is cut off by a partition and comes back without a
split.

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
from pymongo import MongoClient

from cluster import local
from cluster.nodes import alive_nodes, layout, serve_details, worker_index, workers
from cluster.processes import descendants, wait_until
from serve_app.model_repository import VERIFIED_MARKER
from tests.integration.helpers import listener_pid, nginx_servers, record_figures, submit, texts

MODEL = "all-minilm-l6-v2"
CLIENTS = 8


def doors(settings, node: str) -> list[str]:
    """Where NGINX sends requests to a node ("head", "worker-1"): its gateway replicas' own ports with
    direct ingress, else its proxy; host:port as NGINX names them (a worker in a namespace at its address)."""
    return next((row["doors"] for row in layout(settings) if row["node"] == node), [])


def settled(settings) -> bool:
    """Every application RUNNING: no deployment or rolling restart under way."""
    apps = serve_details(settings).get("applications") or {}
    return bool(apps) and all(app.get("status") == "RUNNING" for app in apps.values())


def running(settings, node: str) -> list[str]:
    """The replicas running on a node ("head", "worker-1"), by deployment name."""
    return next((row["replicas"] for row in layout(settings) if row["node"] == node), [])


def with_workers(settings, count: int):
    return settings.model_copy(update={"workers": count})


def served_by(settings, request_ids: set[str]) -> list[str]:
    """Which door answered each of these requests, from NGINX's access log (the last upstream tried)."""
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
    """The app is RUNNING (no rolling restart under way) with the model on both nodes and a gateway on
    the worker, whose door NGINX balances to."""
    worker = running(settings, "worker-1")
    door = doors(settings, "worker-1")
    return (
        settled(settings)
        and "EmbeddingModel" in running(settings, "head")
        and {"EmbeddingModel", "Gateway"} <= set(worker)
        and bool(door)
        and set(door) <= set(nginx_servers(settings))
    )


def on_the_head_alone(settings) -> bool:
    """What the head runs by itself, redeployed for one node by the node watcher: both model replicas,
    a gateway and a job worker, with nothing still starting."""
    head = running(settings, "head")
    return (
        settled(settings)
        and head.count("EmbeddingModel") >= 2
        and "Gateway" in head
        and "JobWorker" in head
        and not running(settings, "worker-1")
    )


def back_on_one_node(settings) -> bool:
    head = running(settings, "head")
    return (
        settled(settings)
        and not running(settings, "worker-1")
        and head.count("Gateway") == 1
        and head.count("EmbeddingModel") >= 2
        and bool(doors(settings, "head"))
        and set(nginx_servers(settings)) <= {*doors(settings, "head"), f"{settings.serve_host}:{settings.serve_port}"}
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


def test_a_worker_node_serves_through_its_own_door_with_weights_it_pulled(settings, api, worker):
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
    answered = set(served_by(settings, ids))
    assert answered & set(doors(settings, "head")), f"no request reached the head's door: {answered}"
    assert answered & set(doors(settings, "worker-1")), f"no request reached the worker's door: {answered}"


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


def test_losing_the_worker_nodes_door_under_load_costs_at_most_its_in_flight_requests(settings, auth_headers, worker):
    """The process NGINX sends the worker's share to (its gateway replica with direct ingress, else its
    proxy) killed: NGINX retries embeddings on the head's door while Serve replaces it."""
    namespace = workers(settings, 1)[0].namespace

    def door_pid() -> tuple[str, int | None]:  # the listener behind the worker's door, on its loopback
        door = (doors(settings, "worker-1") or [":0"])[0]
        port = int(door.rsplit(":", 1)[1])
        return door, listener_pid(port, namespace=namespace.name if namespace else None, host=settings.serve_host)

    door, before = door_pid()
    assert before is not None, f"nothing listens behind the worker's door {door}"
    with Load(settings, auth_headers) as load:
        time.sleep(4)
        killed_at = time.monotonic()
        os.kill(before, signal.SIGKILL)
        assert wait_until(lambda: door_pid()[1] not in (None, before), 60, interval_s=0.2), layout(settings)
        replaced = time.monotonic() - killed_at
        assert wait_until(lambda: door_pid()[0] in nginx_servers(settings), 30, interval_s=0.2), layout(settings)
        in_nginx = time.monotonic() - killed_at
        time.sleep(4)
    failed = [o for o in load.outcomes if o.status != 200]
    in_flight = [o for o in load.outcomes if o.started <= killed_at <= o.ended]
    figures = {
        "requests": len(load.outcomes),
        "failed": len(failed),
        "in_flight_at_loss": len(in_flight),
        "seconds_to_new_door": round(replaced, 1),
        "seconds_to_nginx_using_it": round(in_nginx, 1),
    }
    record_figures(settings, "door_loss_two_nodes", figures)
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
            return on_the_head_alone(settings)

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
    record_figures(settings, "node_loss", figures)
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
    record_figures(
        settings,
        "rejoin",
        {"seconds_to_join": round(joined, 1), "seconds_to_serve": round(time.monotonic() - started, 1)},
    )
    answer = api.post("/v1/embeddings", json={"model": MODEL, "input": "after the rejoin"})
    assert answer.status_code == 200


def in_namespace(pid: int, namespace: str) -> bool:
    """Whether a process lives in a node's network namespace (its job worker, say)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{namespace}").st_ino
    except OSError:
        return False


def worker_node_ids(settings) -> list[str]:
    """The ids of every alive Ray node that says it is worker node 1."""
    return [n["node_id"] for n in alive_nodes(settings) if worker_index(n) == 1]


@pytest.mark.usefixtures("worker")
def test_a_partition_cuts_the_worker_off_its_jobs_finish_once_and_it_comes_back_without_a_split(
    settings, api, auth_headers
):
    node = workers(settings, 1)[0]
    namespace = node.namespace
    if namespace is None:
        pytest.skip("a partition needs the netns layout (root, iproute2 and nftables; INFER_NODE_NETWORK)")
    assert wait_until(
        lambda: serving_on_two_nodes(settings) and "JobWorker" in running(settings, "worker-1"), 240, interval_s=1
    ), layout(settings)
    [cut_off_node] = worker_node_ids(settings)
    figures: dict = {}
    with MongoClient(settings.mongo_url, **settings.mongo_options()) as mongo:
        jobs = mongo[settings.mongo_db]["jobs"]

        def running_on_the_worker(ids: list[str]) -> set[str]:
            found = jobs.find({"_id": {"$in": ids}, "status": "running"}, {"worker": 1, "progress": 1})
            return {
                job["_id"]
                for job in found
                if in_namespace(job.get("worker", {}).get("pid", 0), namespace.name)
                and job["progress"]["done"] < job["progress"]["total"]
            }

        with Load(settings, auth_headers) as load:
            ids: list[str] = []
            cut: set[str] = set()

            def some_on_the_worker() -> bool:
                cut.update(running_on_the_worker(ids))
                return bool(cut)

            for _ in range(5):  # jobs until one is running on the worker node
                for _ in range(4):
                    answer = submit(api, input=texts(400, "partition"))
                    assert answer.status_code == 202, answer.text
                    ids.append(answer.json()["id"])
                if wait_until(some_on_the_worker, 30, interval_s=0.1):
                    break
            assert cut, "no job ran on the worker node"
            namespace.link_down()
            cut_at = time.monotonic()
            # What the worker was running at the cut, read after it: a cut-off worker writes nothing more.
            cut = running_on_the_worker(ids)
            assert cut, "the worker's jobs ended just before the cut"
            try:
                assert wait_until(lambda: not worker_node_ids(settings), 120, interval_s=0.5), layout(settings)
                figures["seconds_to_node_declared_dead"] = round(time.monotonic() - cut_at, 1)

                assert wait_until(lambda: on_the_head_alone(settings), 180, interval_s=0.5), layout(settings)
                figures["seconds_to_full_strength"] = round(time.monotonic() - cut_at, 1)
                settled_at = time.monotonic()
                finished = wait_until(
                    lambda: jobs.count_documents({"_id": {"$in": ids}, "status": {"$in": ["running", "queued"]}}) == 0,
                    300,
                    interval_s=0.5,
                )
                figures["seconds_to_every_job_ended"] = round(time.monotonic() - cut_at, 1)
                time.sleep(max(0.0, 8 - (time.monotonic() - settled_at)))
            finally:
                load.stop.set()
                namespace.link_up()
        healed_at = time.monotonic()
        ended = {job["_id"]: job for job in jobs.find({"_id": {"$in": ids}})}
        assert finished, {i: ended[i]["status"] for i in ids}
        outcomes = load.outcomes
        failed = [o for o in outcomes if o.status != 200]
        figures.update(
            jobs=len(ids),
            jobs_cut_off=len(cut),
            requests=len(outcomes),
            failed=len(failed),
            failed_statuses=sorted({o.status for o in failed}),
            succeeded_while_cut_off=sum(
                1
                for o in outcomes
                if cut_at < o.ended < cut_at + figures["seconds_to_full_strength"] and o.status == 200
            ),
        )
        # The head kept serving while the worker was cut off; once back at strength, nothing failed.
        assert figures["succeeded_while_cut_off"] > 0, figures
        assert not [o for o in failed if o.started > settled_at + 5], figures
        # Every job finished, those cut off by a delivery on the head after the broker let go of the worker.
        assert {job["status"] for job in ended.values()} == {"succeeded"}, {i: j.get("error") for i, j in ended.items()}
        for job_id in cut:
            job = ended[job_id]
            assert job["attempts"] >= 2, job
            assert not in_namespace(job["worker"]["pid"], namespace.name), job

        # The link is back: the cut-off node was declared dead and never serves again; worker 1 comes back
        # as a new node (`make up WORKERS=1`), one of it, and no job ends a second time.
        time.sleep(10)
        assert cut_off_node not in worker_node_ids(settings)
        local.up(with_workers(settings, 1))
        assert wait_until(lambda: serving_on_two_nodes(settings), 240, interval_s=0.5), layout(settings)
        figures["seconds_to_serve_after_heal"] = round(time.monotonic() - healed_at, 1)
        assert len(worker_node_ids(settings)) == 1
        assert cut_off_node not in worker_node_ids(settings)
        again = {job["_id"]: job for job in jobs.find({"_id": {"$in": ids}})}
        for job_id, job in ended.items():
            assert (again[job_id]["status"], again[job_id]["finished_at"], again[job_id]["attempts"]) == (
                job["status"],
                job["finished_at"],
                job["attempts"],
            ), f"job {job_id} changed after the partition healed"
    for job_id in ids:
        result = api.get(f"/v1/jobs/{job_id}/result")
        assert result.status_code == 200, result.text
        assert len(result.json()["data"]) == 400
    record_figures(settings, "partition", figures)
