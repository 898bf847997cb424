import subprocess
import sys
import time

from cluster.processes import ManagedProcess, _alive, _identity, descendants

# A parent that starts a child in a session of its own (as Ray's raylet does with workers).
SPAWNER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
time.sleep(600)
"""


def test_stop_ends_the_process_and_everything_it_started(tmp_path):
    process = ManagedProcess("spawner", tmp_path)
    pid = process.start([sys.executable, "-c", SPAWNER])
    deadline = time.monotonic() + 10
    while not descendants(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = descendants(pid)
    assert children, "the spawner did not start its child"
    assert process.running
    assert process.pid == pid
    assert process.stop(timeout_s=5)
    assert not process.running
    assert not process.pid_file.exists()
    assert not any(_alive(child) for child in children)


def test_a_stale_pid_file_is_not_running(tmp_path):
    process = ManagedProcess("gone", tmp_path)
    process.pid_file.parent.mkdir(parents=True)
    process.pid_file.write_text("999999999")
    assert not process.running
    assert process.stop() is False


def test_a_reused_pid_is_never_taken_for_ours(tmp_path):
    """A pid file naming a live process that started at another time (pid reuse) is not ours."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        process = ManagedProcess("reused", tmp_path)
        process.pid_file.parent.mkdir(parents=True)
        recorded = _identity(bystander.pid).split()
        recorded[1] = str(int(recorded[1]) - 1)  # the same pid, an earlier start
        process.pid_file.write_text(" ".join(recorded))
        assert not process.running
        assert process.stop() is False
        assert bystander.poll() is None, "the bystander was signalled"
    finally:
        bystander.kill()
        bystander.wait()
