"""Smoke runs of the load test and the benchmark, so they keep working. No timing is asserted."""

import csv
import json
import subprocess
import sys

from serve_app.settings import REPO_ROOT

SETUPS = ("plain", "serve", "full", "cached", "ondemand", "rerank")


def test_benchmark_quick_run_measures_every_setup(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        check=True,
        timeout=600,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    # A quick run takes its own ceiling (both backends, one process per core, batch 16, one round).
    assert set(results["ceiling"]["best"]) == {"torch", "onnx"}
    assert set(results["ceiling"]["best"]["torch"]) == {"16"}
    assert set(results["raw_rerank"]["by_batch_size"]) == {"1", "16"}
    for setup in SETUPS:
        runs = [r for r in results["runs"] if r["setup"] == setup]
        assert {r["size"] for r in runs} == {1, 16}, setup
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in runs), runs
    assert results["jobs"]["status"] == "succeeded"
    assert all(value is not None for value in results["ratios"].values()), results["ratios"]
    assert (tmp_path / "chart.png").stat().st_size > 0


def test_locust_headless_run_has_no_failures(tmp_path, settings):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            "loadtests/locustfile.py",
            "--headless",
            "-u",
            "3",
            "-r",
            "3",
            "-t",
            "6s",
            "--host",
            settings.public_url,
            "--csv",
            str(tmp_path / "locust"),
            "--only-summary",
            "--job-texts",
            "10",
            "--texts-per-request",
            "2",
        ],
        cwd=REPO_ROOT,
        check=True,
        timeout=120,
        capture_output=True,
    )
    with (tmp_path / "locust_stats.csv").open() as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
