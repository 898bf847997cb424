"""More than one Ray node: worker nodes next to the head, and what Serve runs on each.

`make up WORKERS=N` starts N worker nodes on this machine (`ray start --address ...`), each in its
own process group with its own pid file, CPUs, node-local weight cache and Serve proxy port
(Ray 2.60 reads RAY_SERVE_WORKER_PROXY_HTTP_PORT on a worker node for proxies that share a
machine). A worker node is known in Ray by a custom resource of its own (`infer_worker_<i>`),
which is how its proxy's port is found again from Serve's state.

NGINX's upstream list is every live proxy in Serve's own state (`live_upstreams`); the
`nginx-sync` process re-renders and reloads NGINX when that list changes (nodes join or leave).
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cluster.processes import ManagedProcess
from cluster.secrets import ray_auth_headers
from cluster.services import VENV_BIN, Nginx, Ray, Service, ray_env
from cluster.settings import ClusterSettings
from serve_app.settings import REPO_ROOT

WORKER_PREFIX = "ray-worker-"
SYNC_INTERVAL_S = 5.0  # each check asks the dashboard (and Serve's controller); passive checks cover the gap


def dashboard_get(settings: ClusterSettings, path: str, timeout_s: float = 5.0) -> dict:
    """GET a JSON document from the Ray dashboard's API, with the cluster's token."""
    request = urllib.request.Request(f"{settings.dashboard_url}{path}", headers=ray_auth_headers(settings))
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def alive_nodes(settings: ClusterSettings) -> list[dict]:
    """Ray's alive nodes: node_id, node_ip, is_head_node, resources_total."""
    answer = dashboard_get(settings, "/api/v0/nodes?limit=1000&detail=true")
    nodes = answer.get("data", {}).get("result", {}).get("result", [])
    return [n for n in nodes if n.get("state") == "ALIVE"]


def worker_index(node: dict) -> int | None:
    """The index of one of our worker nodes (from its resource), or None for the head or a stranger."""
    for name in node.get("resources_total", {}):
        if match := re.fullmatch(r"infer_worker_(\d+)", name):
            return int(match.group(1))
    return None


def proxy_port(settings: ClusterSettings, node: dict) -> int:
    index = worker_index(node)
    return settings.serve_port if index is None else settings.worker_proxy_port_base + index


def serve_details(settings: ClusterSettings) -> dict:
    return dashboard_get(settings, "/api/serve/applications/")


def live_upstreams(settings: ClusterSettings) -> list[str] | None:
    """host:port of every healthy Serve proxy, from Serve's state; None when it cannot be read."""
    try:
        proxies = serve_details(settings).get("proxies") or {}
        nodes = {n["node_id"]: n for n in alive_nodes(settings)}
    except (OSError, ValueError):
        return None
    upstreams = []
    for node_id, proxy in proxies.items():
        node = nodes.get(node_id)
        if node is None or proxy.get("status") not in ("HEALTHY", "STARTING"):
            continue
        local = node.get("node_ip") == settings.ray_node_ip or ipaddress.ip_address(node["node_ip"]).is_loopback
        host = settings.serve_host if local else node["node_ip"]
        upstreams.append(f"{host}:{proxy_port(settings, node)}")
    return sorted(upstreams) or None


def layout(settings: ClusterSettings) -> list[dict]:
    """Each alive node: its id, address, role, proxy (host:port, status) and the replicas on it."""
    nodes = alive_nodes(settings)
    details = serve_details(settings)
    proxies = details.get("proxies") or {}
    replicas: dict[str, list[str]] = {}
    for app in (details.get("applications") or {}).values():
        for name, deployment in (app.get("deployments") or {}).items():
            for replica in deployment.get("replicas") or []:
                if replica.get("state") == "RUNNING":
                    replicas.setdefault(replica.get("node_id"), []).append(name)
    rows = []
    for node in sorted(nodes, key=lambda n: (not n.get("is_head_node"), worker_index(n) or 0)):
        index = worker_index(node)
        proxy = proxies.get(node["node_id"])
        rows.append(
            {
                "node": "head" if node.get("is_head_node") else f"worker-{index}" if index else "other",
                "node_id": node["node_id"][:12],
                "ip": node.get("node_ip"),
                "proxy": f"{settings.serve_host}:{proxy_port(settings, node)}" if proxy else None,
                "proxy_status": proxy.get("status") if proxy else None,
                "replicas": sorted(replicas.get(node["node_id"], [])),
            }
        )
    return rows


@dataclass
class RayWorker(Service):
    """A Ray worker node on this machine, joined to the head (`ray start --address ... --block`)."""

    index: int = 1
    start_timeout_s = 90.0

    @property
    def address(self) -> str:
        return f"{self.settings.serve_host}:{self.proxy_port} (proxy)"

    @property
    def proxy_port(self) -> int:
        return self.settings.worker_proxy_port_base + self.index

    @property
    def resource(self) -> str:
        return f"infer_worker_{self.index}"

    @property
    def head_address(self) -> str:
        """The head's GCS as this node must dial it. Ray rewrites "127.0.0.1" to the machine's
        outward address when a node may join others, so a head on loopback is named by the same
        address in its IPv4-mapped IPv6 form, where the GCS listens and which Ray leaves alone."""
        if self.settings.ray_node_ip == "127.0.0.1":
            return f"[::ffff:127.0.0.1]:{self.settings.ray_gcs_port}"
        return f"{self.settings.ray_node_ip}:{self.settings.ray_gcs_port}"

    @property
    def cache_dir(self) -> Path:
        return self.settings.state_dir / "nodes" / f"worker-{self.index}" / "model-cache"

    def answers(self) -> bool:
        """Our process runs and Ray lists the node alive (Ray lists a killed node alive a while longer)."""
        if not self.process.running:
            return False
        try:
            return any(self.resource in n.get("resources_total", {}) for n in alive_nodes(self.settings))
        except (OSError, ValueError):
            return False

    def launch(self) -> None:
        s = self.settings
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        env = ray_env(s)
        env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(self.proxy_port)
        env["INFER_MODEL_CACHE_DIR"] = str(self.cache_dir)  # a node-local cache of its own
        # Ray's CLI, through cluster/ray_join.py when the cluster is kept on loopback (see there).
        ray = [sys.executable, "-m", "cluster.ray_join"] if s.ray_node_ip == "127.0.0.1" else [str(VENV_BIN / "ray")]
        argv = [
            *ray,
            "start",
            "--address",
            self.head_address,
            "--block",
            "--node-ip-address",
            s.ray_node_ip,
            "--num-cpus",
            str(s.worker_num_cpus),
            "--resources",
            json.dumps({self.resource: 1}),
            "--temp-dir",
            str(Ray("ray", s).temp_dir),
            "--object-store-memory",
            str(s.ray_object_store_bytes),
            # Ports of its own where Ray's defaults are fixed numbers the head already holds.
            "--dashboard-agent-listen-port",
            str(s.worker_agent_port_base + self.index),
            "--metrics-export-port",
            str(s.ray_metrics_port + self.index),
            "--disable-usage-stats",
        ]
        self.process.start(argv, env=env, cwd=REPO_ROOT)

    def stop(self) -> bool:
        return self.process.stop(timeout_s=30)


def workers(settings: ClusterSettings, count: int | None = None) -> list[RayWorker]:
    """Worker nodes 1..count (default: settings.workers)."""
    count = settings.workers if count is None else count
    return [RayWorker(f"{WORKER_PREFIX}{i}", settings, index=i) for i in range(1, count + 1)]


def recorded_workers(settings: ClusterSettings) -> list[RayWorker]:
    """Every worker node this state dir has a pid file for (running or not)."""
    found = []
    for pid_file in sorted((settings.state_dir / "run").glob(f"{WORKER_PREFIX}*.pid")):
        index = pid_file.stem.removeprefix(WORKER_PREFIX)
        if index.isdigit():
            found.append(RayWorker(pid_file.stem, settings, index=int(index)))
    return found


class NginxSync(Service):
    """Keeps NGINX's upstream list equal to Serve's live proxies (`python -m cluster sync-nginx`)."""

    @property
    def address(self) -> str:
        return "(no port)"

    def answers(self) -> bool:
        return self.process.running

    def launch(self) -> None:
        self.process.start([sys.executable, "-m", "cluster", "sync-nginx"], env=ray_env(self.settings), cwd=REPO_ROOT)


def sync_nginx_once(settings: ClusterSettings, upstreams: list[str]) -> str:
    """Re-render NGINX with these upstreams and reload it if that changed the config."""
    nginx = Nginx("nginx", settings, upstream_list=upstreams)
    if nginx.process.pid is None:
        return "nginx is not running"
    return nginx.ensure()


def sync_nginx_forever(settings: ClusterSettings) -> None:
    """Every SYNC_INTERVAL_S: the live proxies; when they changed, NGINX re-rendered and reloaded. A failure
    (Ray or NGINX not answering) is logged and tried again, waiting longer each time up to 30 s."""
    last: list[str] | None = None
    failures = 0
    while True:
        try:
            upstreams = live_upstreams(settings)
            if upstreams is not None and upstreams != last:
                outcome = sync_nginx_once(settings, upstreams)
                print(f"nginx-sync: upstreams {upstreams}: {outcome}", flush=True)
                last = upstreams
            failures = 0
        except Exception as exc:  # the loop outlives any one failure
            failures += 1
            print(f"nginx-sync: {type(exc).__name__}: {exc}", flush=True)
        time.sleep(SYNC_INTERVAL_S if not failures else min(30.0, SYNC_INTERVAL_S * 2**failures))


def process_of(settings: ClusterSettings, name: str) -> ManagedProcess:
    return ManagedProcess(name, settings.state_dir)
