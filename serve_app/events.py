"""System events in MongoDB: `<db>.system_logs`, kept INFER_SYSTEM_LOG_TTL_DAYS, read at GET /v1/admin/logs.

What goes there: every warning and error the project's own code writes in a replica, through
`serve_app.*` loggers or Serve's `ray.serve` logger (a dependency lost, a job attempt failed, a job
dead-lettered, a model that could not be loaded), and the info lines marked as events
(`extra=EVENT`: a replica started, a model loaded or switched to another version, a dependency
back). The lines still go to the replica's own
log as before; this is a copy an admin can query across every process.

Writing never blocks or fails the caller: records go through a bounded queue to a thread of their
own (the standard library's QueueHandler and QueueListener), which inserts each with a short
timeout; a record that cannot be stored (MongoDB down, the queue full) is dropped and counted. A
MongoDB outage is therefore in the replicas' logs, not in system_logs.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import socket
import threading
from datetime import UTC, datetime, timedelta

from pymongo import ASCENDING, DESCENDING, MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from serve_app.settings import REPO_ROOT, Settings

COLLECTION = "system_logs"
# A job's id on a log line: `extra={JOB: job_id}`. Not "job_id": Serve's log filter drops that name (Ray's own).
JOB = "job"
EVENT = {"event": True}  # logger.info("...", extra=EVENT): an info line that is a system event
SERVE_LOGGER = "ray.serve"
LOGGERS = ("serve_app", SERVE_LOGGER)
OURS = (str(REPO_ROOT / "serve_app"), str(REPO_ROOT / "deployments"))
QUEUE_SIZE = 1000
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
DROPS_LOGGED_EVERY = 100
INDEX_OPTIONS_CONFLICT = 85

logger = logging.getLogger("infer.events")  # not one of LOGGERS: its lines are never copied to MongoDB


def is_event(record: logging.LogRecord) -> bool:
    """A warning or worse, or an info line marked as an event, written by this project's code (not Ray's)."""
    if not record.pathname.startswith(OURS):
        return False
    return record.levelno >= logging.WARNING or bool(getattr(record, "event", False))


class MongoEventHandler(logging.Handler):
    """Inserts each record into system_logs (run by the QueueListener's thread, never by the caller)."""

    def __init__(self, settings: Settings, component: str) -> None:
        super().__init__(level=logging.DEBUG)
        self.settings = settings
        self.component = component
        self.host = socket.gethostname()
        self.dropped = 0
        self._client: MongoClient | None = None
        self._indexed = False

    @property
    def collection(self):
        if self._client is None:
            self._client = MongoClient(
                self.settings.mongo_url, serverSelectionTimeoutMS=2000, timeoutMS=3000, **self.settings.mongo_options()
            )
        return self._client[self.settings.mongo_db][COLLECTION]

    def _ensure_indexes(self) -> None:
        ttl_s = int(timedelta(days=self.settings.system_log_ttl_days).total_seconds())
        try:
            self.collection.create_index([("ts", ASCENDING)], name="ts_ttl", expireAfterSeconds=ttl_s)
        except OperationFailure as exc:
            if exc.code != INDEX_OPTIONS_CONFLICT:
                raise
            self.collection.database.command(
                "collMod", self.collection.name, index={"name": "ts_ttl", "expireAfterSeconds": ttl_s}
            )
        self.collection.create_index([("component", ASCENDING), ("ts", DESCENDING)], name="component_ts")
        self._indexed = True

    def emit(self, record: logging.LogRecord) -> None:
        document = {
            "ts": datetime.fromtimestamp(record.created, UTC),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
            "host": self.host,
            "pid": os.getpid(),
        }
        for field in ("request_id", "job_id", "model", "dependency"):
            if (value := getattr(record, field, None)) is not None:
                document[field] = str(value)
        if (job := getattr(record, JOB, None)) is not None:
            document["job_id"] = str(job)
        if error := getattr(record, "error", None):  # the exception, kept by _DroppingQueueHandler.prepare
            document["error"] = error
        try:
            if not self._indexed:
                self._ensure_indexes()
            self.collection.insert_one(document)
        except PyMongoError as exc:
            self.drop(f"MongoDB: {type(exc).__name__}")

    def drop(self, why: str) -> None:
        """Count a record not stored; say so in the process's own log every DROPS_LOGGED_EVERY."""
        self.dropped += 1
        if self.dropped % DROPS_LOGGED_EVERY == 1:
            logger.warning("system_logs: %d events not stored so far (last: %s)", self.dropped, why)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        super().close()


class _Installed:
    lock = threading.Lock()
    listener: logging.handlers.QueueListener | None = None
    handler: logging.handlers.QueueHandler | None = None
    forwarder: logging.Filter | None = None


def install(settings: Settings, component: str) -> None:
    """Copy this process's events to system_logs as `component` (once per process; later calls do nothing)."""
    with _Installed.lock:
        if _Installed.listener is not None or not settings.system_log_enabled:
            return
        records: queue.Queue = queue.Queue(QUEUE_SIZE)
        sink = MongoEventHandler(settings, component)
        handler = _DroppingQueueHandler(records, sink)
        handler.addFilter(is_event)
        listener = logging.handlers.QueueListener(records, sink, respect_handler_level=True)
        listener.start()
        forwarder = _Forwarder(handler)
        for name in LOGGERS:
            target = logging.getLogger(name)
            if name == SERVE_LOGGER:
                target.addFilter(forwarder)
            else:
                target.addHandler(handler)
            if target.getEffectiveLevel() > logging.INFO:
                target.setLevel(logging.INFO)  # events at info level must reach the handler
        _Installed.listener, _Installed.handler, _Installed.forwarder = listener, handler, forwarder
        atexit.register(uninstall)


def uninstall() -> None:
    """Flush what is queued and detach (tests; a process's exit)."""
    with _Installed.lock:
        if _Installed.listener is None:
            return
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(_Installed.handler)
            logging.getLogger(name).removeFilter(_Installed.forwarder)
        _Installed.listener.stop()
        for handler in _Installed.listener.handlers:
            handler.close()
        _Installed.listener = _Installed.handler = _Installed.forwarder = None


class _Forwarder(logging.Filter):
    """On Serve's `ray.serve` logger, a filter that hands each record to our handler, not a handler: Serve clears
    that logger's handlers whenever it configures a replica's logging (a deployment's logging config changed,
    say), and leaves its filters. The record has no request_id yet (Serve's own handler adds it): taken here
    from Serve's request context."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if is_event(record):
            if getattr(record, "request_id", None) is None and (request_id := _serve_request_id()):
                record.request_id = request_id
            self.handler.handle(record)
        return True


def _serve_request_id() -> str:
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or ""
    except Exception:  # outside a replica, or a Ray that moved it
        return ""


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """A full queue drops the record (counted on the sink) instead of blocking the caller."""

    def __init__(self, records: queue.Queue, sink: MongoEventHandler) -> None:
        super().__init__(records)
        self.sink = sink

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The message without a traceback (the base class folds one in), the exception kept as `error`."""
        message = record.getMessage()
        error = repr(record.exc_info[1])[:500] if record.exc_info and record.exc_info[1] is not None else None
        prepared = super().prepare(record)
        prepared.msg, prepared.args, prepared.error = message, None, error
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.sink.drop("the queue is full")


def log_filter(*, since: datetime | None, level: str | None, component: str | None) -> dict:
    """The MongoDB filter of GET /v1/admin/logs: since a time, at `level` or above, of one component."""
    match: dict = {}
    if since is not None:
        match["ts"] = {"$gte": since}
    if level is not None:
        match["level"] = {"$in": [name for name, number in LEVELS.items() if number >= LEVELS[level]]}
    if component is not None:
        match["component"] = component
    return match
