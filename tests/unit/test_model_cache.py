"""Pruning the node-local weight cache: least recently used versions first, never one in use."""

import fcntl
import os
import time

from serve_app.model_repository import VERIFIED_MARKER, prune_cache


def version(root, name: str, version: str, size: int, used_ago_s: float, verified: bool = True):
    directory = root / name / version
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"w" * size)
    if verified:
        marker = directory / VERIFIED_MARKER
        marker.write_text("digest")
        used = time.time() - used_ago_s
        os.utime(marker, (used, used))
    return directory


def test_the_least_recently_used_versions_go_until_the_cache_fits(tmp_path):
    oldest = version(tmp_path, "a", "1", 400, used_ago_s=7200)
    older = version(tmp_path, "a", "2", 400, used_ago_s=3600)
    recent = version(tmp_path, "b", "1", 400, used_ago_s=1800)
    fetched = version(tmp_path, "c", "1", 400, used_ago_s=0)
    removed = prune_cache(tmp_path, 900, keep=fetched)
    assert removed == [oldest, older]
    assert not oldest.exists()
    assert not older.exists()
    assert recent.exists()
    assert fetched.exists()


def test_what_is_in_use_fetching_or_unverified_is_never_removed(tmp_path):
    fetched = version(tmp_path, "a", "1", 400, used_ago_s=7200)  # the one just asked for
    busy = version(tmp_path, "b", "1", 400, used_ago_s=7200)
    loading = version(tmp_path, "c", "1", 400, used_ago_s=60)  # used a minute ago: a replica may load it
    partial = version(tmp_path, "d", "1", 400, used_ago_s=0, verified=False)  # a download under way
    with (tmp_path / "b" / ".1.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process fetching it
        assert prune_cache(tmp_path, 1, keep=fetched) == []
    assert all(d.exists() for d in (fetched, busy, loading, partial))
    assert prune_cache(tmp_path, 1, keep=fetched) == [busy]  # its lock is free now


def test_a_version_used_between_the_scan_and_its_lock_is_kept(tmp_path, monkeypatch):
    """A cache hit touches the marker under the version's lock: the prune looks again once it holds it."""
    from serve_app import model_repository

    real_flock = fcntl.flock

    stale = version(tmp_path, "a", "1", 400, used_ago_s=7200)
    fetched = version(tmp_path, "b", "1", 400, used_ago_s=0)

    def touched_meanwhile(fh, operation):
        if operation & fcntl.LOCK_EX:
            os.utime(stale / VERIFIED_MARKER)  # another replica's cache hit, just before our lock
        return real_flock(fh, operation)

    monkeypatch.setattr(model_repository.fcntl, "flock", touched_meanwhile)
    assert prune_cache(tmp_path, 1, keep=fetched) == []
    assert stale.exists()
