"""The benchmark's inputs: sentences of one shape, unique per request (a cache miss) or from a fixed set."""

from __future__ import annotations

import random

WORDS = [
    "model",
    "serving",
    "replica",
    "batch",
    "latency",
    "throughput",
    "cluster",
    "request",
    "cache",
    "queue",
    "vector",
    "embedding",
    "sentence",
    "token",
    "gateway",
    "proxy",
    "autoscale",
    "memory",
    "network",
    "storage",
    "object",
    "bucket",
    "version",
    "deploy",
    "config",
    "health",
    "ready",
    "metric",
    "trace",
    "error",
    "retry",
    "job",
    "worker",
    "result",
    "upload",
    "download",
]


def sentence(seed: int, words: int = 12) -> str:
    rng = random.Random(seed)
    return f"item {seed:09d} " + " ".join(rng.choices(WORDS, k=words))


def fresh_batches(size: int, start: int) -> iter:
    """Endless batches of texts never sent before (each run passes its own start)."""
    n = start
    while True:
        yield [sentence(n + i) for i in range(size)]
        n += size


def fixed_set(count: int) -> list[str]:
    return [sentence(10**8 + i) for i in range(count)]
