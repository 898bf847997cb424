"""The benchmark's own check of its numbers."""

import json
from datetime import UTC, datetime, timedelta

from loadtests.bench import above_ceiling, best_of, spread_flags, stored_ceiling
from loadtests.ceiling import cpu_name


def test_a_ratio_above_the_ceiling_of_the_backend_served_is_a_measurement_error():
    ratios = {
        "full/ceiling (onnx, size 16, steady)": 1.143,
        "serve/ceiling (onnx, size 16, steady)": 0.98,
        "full/torch ceiling (size 16, steady)": 1.3,  # another backend's ceiling: may be above 1
        "full/plain (size 16, 32 clients)": 1.04,  # against another setup, not the ceiling: may be above 1
        "rerank/raw rerank (size 16, saturation)": 1.01,
        "jobs/full (size 16, saturation)": None,
    }
    assert above_ceiling(ratios) == ["full/ceiling (onnx, size 16, steady)", "rerank/raw rerank (size 16, saturation)"]
    assert above_ceiling({"serve/ceiling (torch, size 16, steady)": 1.0}) == []


def test_the_ceiling_of_a_backend_is_its_best_layout_at_its_best_batch_size():
    ceiling = {"best": {"torch": {"16": {"texts_per_s": 236.0}, "64": {"texts_per_s": 218.5}}}}
    assert best_of(ceiling, "torch") == 236.0
    assert best_of(ceiling, "onnx") == 0.0  # not measured: the ratio is then None, never a guess


def test_rounds_further_apart_than_15_percent_are_flagged():
    runs = [
        {"setup": "full", "size": 16, "concurrency": 32, "items_per_s": 150.0, "round": 1},
        {"setup": "full", "size": 16, "concurrency": 32, "items_per_s": 120.0, "round": 2},  # 20% apart
        {"setup": "plain", "size": 16, "concurrency": 32, "items_per_s": 100.0, "round": 1},
        {"setup": "plain", "size": 16, "concurrency": 32, "items_per_s": 95.0, "round": 2},
        {"setup": "jobs", "size": 16, "concurrency": 1, "items_per_s": 10.0},  # not in rounds
    ]
    assert spread_flags(runs) == ["full size 16 x32: rounds 150.0, 120.0 spread 20% (over 15%)"]


def test_a_stored_ceiling_counts_only_from_this_kind_of_machine_and_this_week(tmp_path):
    import os

    path = tmp_path / "ceiling.json"
    assert stored_ceiling(path)[0] is None
    fresh = {"cpu": cpu_name(), "cores": os.cpu_count(), "when": datetime.now(UTC).isoformat(), "best": {}}
    path.write_text(json.dumps(fresh))
    assert stored_ceiling(path)[0] == fresh
    path.write_text(json.dumps(fresh | {"cpu": "another CPU"}))
    assert "another machine" in stored_ceiling(path)[1]
    path.write_text(json.dumps(fresh | {"when": (datetime.now(UTC) - timedelta(days=8)).isoformat()}))
    assert "older than a week" in stored_ceiling(path)[1]


def test_an_experiments_ratio_appears_only_when_it_ran():
    """A default run leaves the backends and batchwait experiments out: their ratios must not appear as
    None (the smoke test requires every ratio of a default run to be measured)."""
    from loadtests.bench import Bench

    bench = Bench.__new__(Bench)  # no cluster: only the arithmetic
    bench.sizes = [1, 16]
    bench.results = {"runs": [{"setup": "full", "size": 16, "concurrency": 32, "items_per_s": 150.0}]}
    assert bench.experiment_ratios() == {}
    bench.results["runs"] += [
        {"setup": "full-torch", "size": 16, "concurrency": 32, "items_per_s": 132.6},
        {"setup": "full-onnx", "size": 16, "concurrency": 32, "items_per_s": 146.1},
        {"setup": "full-onnx", "size": 16, "concurrency": 32, "items_per_s": 165.7},
    ]
    assert bench.experiment_ratios() == {"full-onnx/full-torch (size 16, saturation)": 1.25}
    bench.results["priority"] = [
        {"variant": "lanes", "p95_during/alone": 1.4, "job_shared/solo": 0.6},
        {"variant": "lanes", "p95_during/alone": 1.6, "job_shared/solo": 0.55},
        # sync + job above the ceiling: a measurement error, left out of the ratios
        {"variant": "lanes", "p95_during/alone": 9.0, "job_shared/solo": 0.01, "error": "above the ceiling"},
    ]
    assert bench.experiment_ratios()["sync p95 during a job/alone (lanes, worse round)"] == 1.6
    assert bench.experiment_ratios()["job rate beside sync/alone (lanes, worse round)"] == 0.55
