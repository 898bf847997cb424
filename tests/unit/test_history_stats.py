"""The percentile of /v1/admin/stats, read from MongoDB's log-spaced latency buckets."""

import math
import random

from serve_app.history import LATENCY_BUCKETS_PER_DECADE, _nearest_rank


def buckets_of(latencies: list[float]) -> list[tuple[int, int, float]]:
    """What the aggregation returns, computed here: (bucket, count, largest) in bucket order."""
    found: dict[int, list[float]] = {}
    for value in latencies:
        found.setdefault(math.floor(math.log10(max(value, 0.001)) * LATENCY_BUCKETS_PER_DECADE), []).append(value)
    return sorted((bucket, len(values), max(values)) for bucket, values in found.items())


def exact(latencies: list[float], quantile: float) -> float:
    ordered = sorted(latencies)
    return ordered[max(math.ceil(quantile * len(ordered)) - 1, 0)]


def test_a_percentile_is_exact_or_at_most_one_bucket_above():
    rng = random.Random(7)
    latencies = [rng.lognormvariate(3, 1) for _ in range(5000)]
    width = 10 ** (1 / LATENCY_BUCKETS_PER_DECADE)
    for quantile in (0.5, 0.9, 0.99, 1.0):
        got, want = _nearest_rank(buckets_of(latencies), quantile), exact(latencies, quantile)
        assert want <= got <= want * width, (quantile, got, want)


def test_few_distinct_latencies_give_the_exact_nearest_rank():
    latencies = [12.5, 3.25, 40.0, 7.75]
    assert _nearest_rank(buckets_of(latencies), 0.5) == 7.75
    assert _nearest_rank(buckets_of(latencies), 0.99) == 40.0
    assert _nearest_rank([], 0.5) is None
