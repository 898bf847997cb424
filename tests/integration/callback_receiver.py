"""A callback receiver for the integration tests, and the network namespace it lives in.

Callbacks go only to public addresses or to INFER_CALLBACK_ALLOW_NETWORKS, which the local
bring-up sets to 198.18.0.2/32 for the Ray processes. The tests put the receiver at that address,
in a network namespace of its own joined to the host by a veth pair (198.18.0.1/24 on the host's
side), so nothing on the host's loopback is ever allowed.

    python tests/integration/callback_receiver.py --host 198.18.0.2 --port 8001 --port 8002 --log FILE

Each request is appended to FILE, when it arrives and before it is answered, as one JSON line:
{"port", "path", "headers" (lower-case names), "body", "received_at" (epoch seconds)}. The answer
depends on the path's first segment: /500/... answers 500, /hang/... never answers, anything
else answers 200.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST_ADDRESS = "198.18.0.1"
RECEIVER_ADDRESS = "198.18.0.2"
PREFIX_LENGTH = 24
NAMESPACE_PREFIX = "infer-cb-"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        record = {
            "port": self.server.server_address[1],
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
            "received_at": time.time(),
        }
        with self.server.lock, open(self.server.log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        first = self.path.lstrip("/").split("/", 1)[0]
        if first == "hang":
            threading.Event().wait()  # never answers
        status = 500 if first == "500" else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def serve(host: str, ports: list[int], log_path: str) -> None:
    lock = threading.Lock()
    servers = []
    for port in ports:
        server = ThreadingHTTPServer((host, port), _Handler)
        server.daemon_threads = True
        server.lock = lock
        server.log_path = log_path
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


# -- the namespace (used by tests/integration/test_callbacks.py) ---------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def remove_stale_namespaces() -> None:
    """Namespaces this helper made in test sessions that have died (their veth pairs go with them)."""
    from cluster.processes import _alive as alive  # here: the receiver itself runs as a bare script

    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{NAMESPACE_PREFIX}(\d+)-[0-9a-f]+", name)
        if match and not alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)


class ReceiverNamespace:
    """A network namespace holding RECEIVER_ADDRESS, with the receiver running inside it."""

    def __init__(self, ports: list[int], log_path: Path) -> None:
        tag = secrets.token_hex(3)
        self.name = f"{NAMESPACE_PREFIX}{os.getpid()}-{tag}"
        self.host_link, self.inner_link = f"icb{tag}h", f"icb{tag}n"
        self.ports = ports
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> ReceiverNamespace:
        remove_stale_namespaces()
        holders = _ip("-o", "addr", "show", "to", f"{HOST_ADDRESS}/32", check=False).stdout.strip()
        if holders:
            raise RuntimeError(f"{HOST_ADDRESS} is already in use (another test session's receiver?): {holders}")
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.inner_link)
            _ip("link", "set", self.inner_link, "netns", self.name)
            _ip("addr", "add", f"{HOST_ADDRESS}/{PREFIX_LENGTH}", "dev", self.host_link)
            _ip("link", "set", self.host_link, "up")
            inside = ("netns", "exec", self.name, "ip")
            _ip(*inside, "addr", "add", f"{RECEIVER_ADDRESS}/{PREFIX_LENGTH}", "dev", self.inner_link)
            _ip(*inside, "link", "set", self.inner_link, "up")
            _ip(*inside, "link", "set", "lo", "up")
            self.log_path.touch()
            # As a module from the repository root: run as a script, its folder would come first on
            # sys.path, and the tests' own http/ package would hide the standard library's.
            argv = [sys.executable, "-m", "tests.integration.callback_receiver", "--host", RECEIVER_ADDRESS, "--log"]
            argv += [str(self.log_path), *(arg for port in self.ports for arg in ("--port", str(port)))]
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv],
                stdout=subprocess.PIPE,
                cwd=Path(__file__).resolve().parents[2],
            )
            self._wait_until_reachable()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_reachable(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection((RECEIVER_ADDRESS, self.ports[0]), timeout=1):
                    return
            except OSError:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"the callback receiver exited with {self.process.returncode}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # by its pid: `ip netns exec` execs the receiver itself
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        _ip("netns", "del", self.name, check=False)  # takes its end of the veth pair, and so both
        _ip("link", "del", self.host_link, check=False)

    def records(self) -> list[dict]:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def __enter__(self) -> ReceiverNamespace:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=RECEIVER_ADDRESS)
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    serve(args.host, args.port, args.log)


if __name__ == "__main__":
    main()
