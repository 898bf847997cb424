"""Which log lines are system events, the admin filter, and a full queue that drops instead of blocking."""

import logging
import queue

from serve_app import events
from serve_app.settings import REPO_ROOT, Settings


def record(level: int, path: str, **extra) -> logging.LogRecord:
    made = logging.LogRecord("ray.serve", level, path, 1, "a message %s", ("x",), None)
    made.__dict__.update(extra)
    return made


def test_only_our_codes_warnings_and_marked_info_lines_are_events():
    ours = str(REPO_ROOT / "serve_app" / "jobs" / "runner.py")
    theirs = "/usr/lib/python3/site-packages/ray/serve/_private/replica.py"
    assert events.is_event(record(logging.WARNING, ours))
    assert events.is_event(record(logging.ERROR, str(REPO_ROOT / "deployments" / "model_pool.py")))
    assert events.is_event(record(logging.INFO, ours, **events.EVENT))
    assert not events.is_event(record(logging.INFO, ours))
    assert not events.is_event(record(logging.ERROR, theirs))  # Ray's own lines stay in Ray's logs


def test_the_level_filter_means_this_level_or_worse():
    assert events.log_filter(since=None, level="warning", component="JobWorker") == {
        "level": {"$in": ["warning", "error", "critical"]},
        "component": "JobWorker",
    }
    assert events.log_filter(since=None, level=None, component=None) == {}


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    sink = events.MongoEventHandler(Settings(), "gateway")
    handler = events._DroppingQueueHandler(queue.Queue(1), sink)
    handler.enqueue(record(logging.WARNING, "x"))
    handler.enqueue(record(logging.WARNING, "x"))  # the queue is full: dropped at once
    assert sink.dropped == 1


def test_an_unreachable_mongodb_drops_the_record_and_counts_it():
    sink = events.MongoEventHandler(Settings(mongo_url="mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=100"), "x")
    sink.emit(record(logging.WARNING, str(REPO_ROOT / "serve_app" / "x.py"), job_id="j1"))
    assert sink.dropped == 1
    sink.close()


def test_an_exception_is_kept_apart_from_the_message():
    sink = events.MongoEventHandler(Settings(), "gateway")
    handler = events._DroppingQueueHandler(queue.Queue(1), sink)
    try:
        raise ValueError("the cause")
    except ValueError:
        import sys

        made = logging.LogRecord("ray.serve", logging.ERROR, "x", 1, "it failed: %s", ("why",), sys.exc_info())
    prepared = handler.prepare(made)
    assert prepared.getMessage() == "it failed: why"
    assert prepared.error == "ValueError('the cause')"
    assert prepared.exc_info is None


def test_critical_is_worse_than_error_in_the_filter():
    assert "critical" in events.log_filter(since=None, level="error", component=None)["level"]["$in"]


def test_events_on_serves_logger_survive_serve_clearing_its_handlers(monkeypatch):
    """Serve's configure_component_logger clears `ray.serve`'s handlers when it reconfigures a replica's logging;
    the copy to system_logs is a filter on that logger, so it keeps working."""
    stored: list[logging.LogRecord] = []
    monkeypatch.setattr(events.MongoEventHandler, "emit", lambda self, r: stored.append(r))
    serve_logger = logging.getLogger("ray.serve")
    events.install(Settings(), "JobWorker")
    try:
        serve_logger.handlers.clear()  # what Serve does
        path = str(REPO_ROOT / "serve_app" / "jobs" / "runner.py")
        serve_logger.handle(record(logging.WARNING, path, job="j-7"))
        serve_logger.handle(record(logging.INFO, path))  # not an event
    finally:
        events.uninstall()  # flushes the queue
    assert [(r.levelno, r.job) for r in stored] == [(logging.WARNING, "j-7")]
    assert events._Installed.forwarder is None
    assert all(not isinstance(f, events._Forwarder) for f in serve_logger.filters)
