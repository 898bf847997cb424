"""The ceiling's report: the best layout per backend and size, and the flags a skeptic needs."""

from loadtests.ceiling import Point, report, table


def test_the_best_layout_is_the_ceiling_and_a_spread_or_a_busy_machine_is_flagged():
    points = [
        Point("torch", 1, 2, 16, rounds=[200.0, 210.0], busy_before=[0.01, 0.02]),
        Point("torch", 2, 1, 16, rounds=[230.0, 180.0], busy_before=[0.01, 0.30]),  # 22% apart, busy once
        Point("onnx", 1, 2, 16, rounds=[400.0, 404.0], busy_before=[0.0, 0.0]),
        Point("onnx", 2, 1, 16, rounds=[390.0, 395.0], busy_before=[0.0, 0.0]),
    ]
    result = report(points, cores=2)
    assert result["best"]["torch"]["16"] == {"texts_per_s": 230.0, "layout": "2 proc x 1 thr"}
    assert result["best"]["onnx"]["16"] == {"texts_per_s": 404.0, "layout": "1 proc x 2 thr"}
    assert result["ceiling"] == {"16": 404.0}
    # What the bench checks before it uses a stored ceiling:
    assert result["cores"] == 2
    assert result["cpu"]
    assert result["when"]
    assert len(result["flags"]) == 2
    assert "spread 22%" in result["flags"][0]
    assert "not idle" in result["flags"][1]
    shown = table(result)
    assert "onnx / torch, batch 16, best against best: 1.76" in shown
    assert "| torch | 2 proc x 1 thr | 16 | 230.0, 180.0 | 230.0 | 22% FLAG | NO |" in shown
