"""Processes the bring-up starts: a pid file each, stopped only by that pid (and its process group)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _identity(pid: int) -> str | None:
    """pid, start time and boot id: what tells our process from a later one given the same pid."""
    try:
        start_time = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
        return f"{pid} {start_time} {BOOT_ID.read_text().strip()}"
    except (OSError, IndexError):
        return None


class ManagedProcess:
    """One long-running program started in its own session, with its pid under <state>/run/.

    The pid file holds the pid, the process's start time and the boot id, so a pid reused by
    another program after a crash or reboot is never taken for ours.
    """

    def __init__(self, name: str, state_dir: Path) -> None:
        self.name = name
        self.pid_file = state_dir / "run" / f"{name}.pid"
        self.log_file = state_dir / "logs" / f"{name}.log"

    @property
    def pid(self) -> int | None:
        try:
            recorded = self.pid_file.read_text().strip()
            pid = int(recorded.split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if _alive(pid) and _identity(pid) == recorded else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> int:
        """Start argv detached from this process (its own session, so it outlives us)."""
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                umask=0o077,  # its logs, data and sockets are for this user alone
            )
        self.pid_file.write_text(_identity(proc.pid) or str(proc.pid))
        return proc.pid

    def stop(self, timeout_s: float = 20.0, *, before: Callable[[], None] | None = None) -> bool:
        """Stop the process and its process group; `before` may ask it to stop gracefully first.

        Returns whether anything was stopped.
        """
        pid = self.pid
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        # Everything it forked, even what moved to a session of its own (Ray's workers do).
        tree = [pid, *descendants(pid)]
        if before is not None:
            with contextlib.suppress(Exception):
                before()
        for member in tree:
            _signal_group(member, signal.SIGTERM)
        identities = {member: _identity(member) for member in tree}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.2)
        for member in tree:
            if _alive(member) and _identity(member) == identities[member]:
                _signal_group(member, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def descendants(root: int) -> list[int]:
    """Every process below root, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(") ", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [root]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found.extend(kids)
        frontier.extend(kids)
    return found


def _signal_group(pid: int, sig: int) -> None:
    """Signal pid, and its process group where it leads one."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if check():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
