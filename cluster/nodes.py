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

from cluster.netns import NodeNamespace
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


def node_ids(settings: ClusterSettings) -> list[str]:
    """The ids of the alive nodes, sorted."""
    return sorted(node["node_id"] for node in alive_nodes(settings))


def worker_index(node: dict) -> int | None:
    """The index of one of our worker nodes (from its resource), or None for the head or a stranger."""
    for name in node.get("resources_total", {}):
        if match := re.fullmatch(r"infer_worker_(\d+)", name):
            return int(match.group(1))
    return None


def proxy_port(settings: ClusterSettings, node: dict) -> int:
    index = worker_index(node)
    return settings.serve_port if index is None else settings.worker_proxy_port_base + index


def proxy_address(settings: ClusterSettings, node: dict) -> str:
    """host:port where NGINX reaches a node's proxy: Serve's own host on this machine's nodes, the node's
    address for a node elsewhere (in the netns layout, the namespace forwards it to the proxy's loopback)."""
    local = node.get("node_ip") == settings.ray_node_ip or ipaddress.ip_address(node["node_ip"]).is_loopback
    return f"{settings.serve_host if local else node['node_ip']}:{proxy_port(settings, node)}"


def serve_details(settings: ClusterSettings) -> dict:
    return dashboard_get(settings, "/api/serve/applications/")


def ingress_targets(settings: ClusterSettings, details: dict) -> dict[str, str]:
    """With direct ingress (INFER_SERVE_DIRECT_INGRESS): each running gateway replica's own HTTP server, by
    replica id, as host:port NGINX reaches it at, from Serve's target groups."""
    found = {}
    for group in details.get("target_groups") or []:
        if group.get("app_name") != settings.serve_app_name or group.get("protocol") != "HTTP":
            continue
        for target in group.get("targets") or []:
            ip, port, name = target.get("ip"), target.get("port"), str(target.get("name", ""))
            if not name.startswith("SERVE_REPLICA::") or not ip or not port:
                continue
            local = ip == settings.ray_node_ip or ipaddress.ip_address(ip).is_loopback
            # A replica binds Serve's http host: this machine's nodes are reached there, a node in a
            # namespace at its address (the namespace forwards it to loopback, cluster/netns.py).
            found[name.rsplit("#", 1)[-1]] = f"{settings.serve_host if local else ip}:{port}"
    return found


def ingress_upstreams(settings: ClusterSettings, details: dict) -> list[str] | None:
    """host:port of every running gateway replica's own HTTP server; None while none runs (Serve then
    names the head's proxy in its target groups instead)."""
    return sorted(ingress_targets(settings, details).values()) or None


def live_upstreams(settings: ClusterSettings, alive: list[dict] | None = None) -> list[str] | None:
    """NGINX's servers, from Serve's state; None when it cannot be read.

    Without direct ingress: host:port of every healthy Serve proxy. With it: every gateway replica's own
    port, and the Serve proxy (on the head node only) as a backup ("host:port backup"), which NGINX uses
    only while no replica's port answers (a replica replaced, its new port not yet read here); the proxy
    alone while no gateway replica runs. `alive`: Ray's alive nodes when the caller has just read them."""
    try:
        details = serve_details(settings)
        proxies = details.get("proxies") or {}
        nodes = {n["node_id"]: n for n in (alive_nodes(settings) if alive is None else alive)}
    except (OSError, ValueError):
        return None
    upstreams = []
    for node_id, proxy in proxies.items():
        node = nodes.get(node_id)
        if node is None or proxy.get("status") not in ("HEALTHY", "STARTING"):
            continue
        upstreams.append(proxy_address(settings, node))
    direct = ingress_upstreams(settings, details) if settings.serve_direct_ingress else None
    if direct:
        return direct + [f"{upstream} backup" for upstream in sorted(upstreams)]
    return sorted(upstreams) or None


def layout(settings: ClusterSettings, details: dict | None = None) -> list[dict]:
    """Each alive node: its id, address, role, proxy (host:port, status), the replicas on it and its doors
    (where NGINX sends requests to it: its gateway replicas' own ports with direct ingress, else its proxy)."""
    nodes = alive_nodes(settings)
    details = serve_details(settings) if details is None else details
    proxies = details.get("proxies") or {}
    targets = ingress_targets(settings, details) if settings.serve_direct_ingress else {}
    replicas: dict[str, list[str]] = {}
    doors: dict[str, list[str]] = {}
    for app in (details.get("applications") or {}).values():
        for name, deployment in (app.get("deployments") or {}).items():
            for replica in deployment.get("replicas") or []:
                if replica.get("state") == "RUNNING":
                    replicas.setdefault(replica.get("node_id"), []).append(name)
                    if replica.get("replica_id") in targets:
                        doors.setdefault(replica.get("node_id"), []).append(targets[replica["replica_id"]])
    rows = []
    for node in sorted(nodes, key=lambda n: (not n.get("is_head_node"), worker_index(n) or 0)):
        index = worker_index(node)
        proxy = proxies.get(node["node_id"])
        rows.append(
            {
                "node": "head" if node.get("is_head_node") else f"worker-{index}" if index else "other",
                "node_id": node["node_id"][:12],
                "ip": node.get("node_ip"),
                "proxy": proxy_address(settings, node) if proxy else None,
                "proxy_status": proxy.get("status") if proxy else None,
                "replicas": sorted(replicas.get(node["node_id"], [])),
                "doors": sorted(doors.get(node["node_id"], []))
                if targets
                else [proxy_address(settings, node)]
                if proxy
                else [],
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
        host = self.namespace.address if self.namespace else self.settings.serve_host
        return f"{host}:{self.proxy_port} (proxy)"

    @property
    def namespace(self) -> NodeNamespace | None:
        """The node's own network namespace (netns layout), or None when it shares the head's."""
        return NodeNamespace(self.settings.node_subnet, self.index) if self.settings.netns_layout else None

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
        if self.settings.ray_node_ip == "127.0.0.1" and not self.namespace:
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
        namespace = self.namespace
        if namespace:
            namespace.ensure()
            env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
            env.update(s.node_service_env())  # the stores at the bridge address, not the node's own loopback
            namespace.forward_to_loopback([self.proxy_port, s.serve_direct_ingress_ports])
            ray = [str(VENV_BIN / "ray")]
            node_ip = namespace.address
        elif s.ray_node_ip == "127.0.0.1":
            ray = [sys.executable, "-m", "cluster.ray_join"]  # Ray's CLI kept on loopback (see there)
            node_ip = s.ray_node_ip
        else:
            ray, node_ip = [str(VENV_BIN / "ray")], s.ray_node_ip
        argv = [
            *ray,
            "start",
            "--address",
            self.head_address,
            "--block",
            "--node-ip-address",
            node_ip,
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
        self.process.start(namespace.exec_argv(argv) if namespace else argv, env=env, cwd=REPO_ROOT)

    def stop(self) -> bool:
        stopped = self.process.stop(timeout_s=30)
        if self.namespace:
            self.namespace.remove()
        return stopped


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
    """Every SYNC_INTERVAL_S: the live proxies; when they changed, NGINX re-rendered and reloaded. And the
    alive nodes: when they changed (a node lost, cut off, joined), the Serve config is deployed again for
    them, so a lost node's replicas come back on the others (load_serve_config). A failure (Ray or NGINX
    not answering) is logged and tried again, waiting longer each time up to 30 s."""
    from cluster.local import deploy  # (cluster.local imports this module)

    last: list[str] | None = None
    nodes: list[str] | None = None
    failures = 0
    while True:
        try:
            found = alive_nodes(settings)  # once per check, for the proxies and the node set alike
            upstreams = live_upstreams(settings, found)
            if upstreams is not None and upstreams != last:
                outcome = sync_nginx_once(settings, upstreams)
                print(f"nginx-sync: upstreams {upstreams}: {outcome}", flush=True)
                last = upstreams
            alive = sorted(node["node_id"] for node in found)
            if nodes is not None and alive != nodes:
                deploy(settings)
                print(f"nginx-sync: nodes {len(nodes)} -> {len(alive)}: Serve config deployed for them", flush=True)
            nodes = alive
            failures = 0
        except Exception as exc:  # the loop outlives any one failure
            failures += 1
            print(f"nginx-sync: {type(exc).__name__}: {exc}", flush=True)
        time.sleep(SYNC_INTERVAL_S if not failures else min(30.0, SYNC_INTERVAL_S * 2**failures))


def process_of(settings: ClusterSettings, name: str) -> ManagedProcess:
    return ManagedProcess(name, settings.state_dir)
