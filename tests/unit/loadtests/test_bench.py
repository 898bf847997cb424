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
