"""The benchmark's own check of its numbers."""

from loadtests.bench import above_ceiling


def test_a_ratio_above_the_bare_models_ceiling_is_a_measurement_error():
    ratios = {
        "full/raw (size 16, saturation)": 1.143,
        "serve/raw (size 16, saturation)": 0.98,
        "full/plain (size 16, 32 clients)": 1.04,  # against another setup, not the ceiling: may be above 1
        "jobs/full (size 16, saturation)": None,
    }
    assert above_ceiling(ratios) == ["full/raw (size 16, saturation)"]
    assert above_ceiling({"serve/raw (size 16, saturation)": 1.0}) == []


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
