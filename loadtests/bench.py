"""The side-by-side benchmark: the same model and inputs, six ways, in one run on one machine.

    python -m loadtests.bench            # full run (a few minutes); needs `make up`
    python -m loadtests.bench --quick    # a smoke run of every setup (seconds each)

Setups: ceiling (the bare model in-process: the best backend, layout and batch size, from `make
ceiling`'s stored result taken on an idle machine, or taken now with the cluster up and flagged),
plain (FastAPI + uvicorn, model in-process), serve (Serve directly, every item a cache miss), full
(through NGINX, misses), cached (through NGINX, every item a hit), jobs (the same items as one
asynchronous job), ondemand (the same weights pushed under another name, so the multiplexed ModelPool
serves them, through NGINX, misses), rerank (a MiniLM-L6 cross-encoder, the default model's encoder
with a fresh one-label head, on demand through NGINX /v1/rerank, every pair new, against the same
cross-encoder in-process, all cores). plain, serve, full and cached run in two rounds, interleaved
(A B C D A B C D); the report gives both and flags a spread over 15%. A ratio against the ceiling of
the backend served above 1.0 fails the run as a measurement error. Experiments not in the default
run: backends, batchwait, priority (sync requests next to a 3,000-text job, lanes off and on), cold
(a burst after a minute idle), door (NGINX in front of Serve's proxy and of the gateway replicas' own
ports, direct ingress: the default, not INFER_SERVE_DIRECT_INGRESS=0) and fused
(loadtests/fused_app.py, the gateway and the model in one deployment, reached like serve); name them
with `--setups`. The load generator is its own process
and reports the CPU it used. Writes results.json and chart.png to the results directory
and, for a full run, the tables in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import httpx

from cluster.processes import ManagedProcess, wait_until
from cluster.settings import ClusterSettings, get_cluster_settings
from loadtests.loadgen import API_KEY_ENV
from loadtests.texts import fixed_set, fresh_batches
from serve_app.auth.key_store import issue_key
from serve_app.settings import REPO_ROOT

MODEL = "all-minilm-l6-v2"
METRICS_SETTLE_S = 5.0  # Ray exports metrics every 2 s (RAY_metrics_report_interval_ms); wait two rounds
QUICK_SETTLE_S = 2.5  # a --quick run prints the batch size, never asserts it: one round is enough
DOC = REPO_ROOT / "docs" / "benchmarks.md"
ALL_SETUPS = ("ceiling", "plain", "serve", "full", "cached", "jobs", "ondemand", "rerank")
IN_ROUNDS = ("plain", "serve", "full", "cached")  # measured in rounds, interleaved (A B C D A B C D)
ROUNDS = 2
SPREAD_FLAG = 0.15  # rounds of one point further apart than this are flagged
CEILING_FILE = REPO_ROOT / "loadtests" / "results" / "ceiling.json"  # what `make ceiling` writes
CEILING_MAX_AGE_S = 7 * 86400
ONDEMAND_MODEL = "bench-ondemand"  # the default model's weights under a name the Serve config does not pin
RERANK_MODEL = "bench-reranker"
# The model's lanes: off (one queue), on (people always first), on with half the contested batches for jobs.
PRIORITY_VARIANTS = {
    "fifo": {"interactive_first": False, "background_share": 0.0},
    "lanes": {"interactive_first": True, "background_share": 0.0},
    "share-0.5": {"interactive_first": True, "background_share": 0.5},
}
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def is_above_ceiling(name: str, value: float | None) -> bool:
    """A ratio against the bare model on the same backend ("<setup>/ceiling ...", "<setup>/raw ...") above 1.0:
    the stack cannot beat the model it runs, so such a ratio is a measurement error (a ceiling taken badly, a
    noisy moment), not a result. Against another backend's ceiling ("/torch ceiling") it may be above 1."""
    return ("/raw" in name or "/ceiling" in name) and value is not None and value > 1.0


def stored_ceiling(path: Path = CEILING_FILE) -> tuple[dict | None, str]:
    """`make ceiling`'s result, if it was taken on this kind of machine in the last week: (it, why or why not)."""
    from loadtests.ceiling import cpu_name

    if not path.exists():
        return None, f"no {path.name} (run `make ceiling` with the cluster down)"
    result = json.loads(path.read_text())
    if (result.get("cpu"), result.get("cores")) != (cpu_name(), os.cpu_count()):
        return None, f"{path.name} was taken on another machine ({result.get('cpu')}, {result.get('cores')} cores)"
    taken = datetime.fromisoformat(result["when"])
    if (datetime.now(UTC) - taken).total_seconds() > CEILING_MAX_AGE_S:
        return None, f"{path.name} is older than a week ({result['when']})"
    return result, f"{path.name}, taken {result['when']} by `make ceiling`"


def best_of(ceiling: dict, backend: str) -> float:
    """A backend's ceiling: its best layout at its best batch size."""
    return max((row["texts_per_s"] for row in ceiling.get("best", {}).get(backend, {}).values()), default=0.0)


def spread_flags(runs: list[dict]) -> list[str]:
    """Points measured in rounds whose rounds are further apart than SPREAD_FLAG."""
    by_point: dict[tuple, list[float]] = {}
    for run in runs:
        if "round" in run:
            by_point.setdefault((run["setup"], run["size"], run["concurrency"]), []).append(run["items_per_s"])
    flags = []
    for (setup, size, concurrency), values in by_point.items():
        if len(values) > 1 and max(values) > 0 and (max(values) - min(values)) / max(values) > SPREAD_FLAG:
            spread = (max(values) - min(values)) / max(values)
            flags.append(
                f"{setup} size {size} x{concurrency}: rounds {', '.join(f'{v:.1f}' for v in values)} "
                f"spread {spread:.0%} (over {SPREAD_FLAG:.0%})"
            )
    return flags


def above_ceiling(ratios: dict[str, float | None]) -> list[str]:
    return [name for name, value in ratios.items() if is_above_ceiling(name, value)]


class Bench:
    def __init__(
        self,
        settings: ClusterSettings,
        out: Path,
        *,
        sizes: list[int],
        levels: list[int],
        duration_s: float,
        job_items: int,
    ) -> None:
        self.settings = settings
        self.out = out
        self.sizes = sizes
        self.levels = levels
        self.duration_s = duration_s
        self.job_items = job_items
        self.fresh_start = int(time.time() * 1000) % 10**6 * 1000  # texts this run alone sends
        self.results: dict = {"runs": [], "ceiling": {}, "jobs": {}, "raw_rerank": {}}
        self.round: int | None = None  # the round of the points being measured, for the setups in rounds
        self.quick = False
        # Its own key without a rate limit or job quota: the limit is still looked up and applied.
        self.api_key = asyncio.run(
            issue_key(
                settings,
                "bench",
                "the benchmark (make bench)",
                name="bench",
                rate_per_s=0,
                max_jobs=0,
                token_rate_per_s=0,
                max_inflight_tokens=0,
            )
        )
        self.headers = {"Authorization": f"Bearer {self.api_key}"}

    # -- measuring ------------------------------------------------------------------------

    def loadgen(self, url: str, concurrency: int, size: int, mode: str, model: str = MODEL) -> dict:
        self.fresh_start += 10**6
        command = [
            sys.executable,
            "-m",
            "loadtests.loadgen",
            url,
            "--concurrency",
            str(concurrency),
            "--size",
            str(size),
            "--duration",
            str(self.duration_s),
            "--mode",
            mode,
            "--start",
            str(self.fresh_start),
            "--model",
            model,
        ]
        env = {**os.environ, API_KEY_ENV: self.api_key}
        result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO_ROOT, env=env)
        return json.loads(result.stdout.strip().splitlines()[-1])

    def batch_texts(self) -> tuple[float, float]:
        """(texts, batches) the model has computed, from Ray's metrics endpoint.

        Texts come from the embedding_texts_computed counter: the histogram's _sum is estimated
        by Ray from bucket bounds, not exact.
        """
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.settings.ray_metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return (0.0, 0.0)

        def total(metric: str) -> float:
            return sum(float(m.group(1)) for m in re.finditer(rf"^{metric}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M))

        return total("ray_embedding_texts_computed_total"), total("ray_embedding_batch_texts_count")

    def measure(
        self, setup: str, url: str, mode: str = "fresh", model_metrics: bool = True, model: str = MODEL
    ) -> None:
        for size in self.sizes:
            for concurrency in self.levels:
                before = self.batch_texts() if model_metrics else None
                run = self.loadgen(url, concurrency, size, mode, model)
                if model_metrics:
                    time.sleep(QUICK_SETTLE_S if self.quick else METRICS_SETTLE_S)
                    after = self.batch_texts()
                    batches = after[1] - before[1]
                    run["mean_batch_texts"] = round((after[0] - before[0]) / batches, 2) if batches else "-"
                else:
                    run["mean_batch_texts"] = size if setup == "plain" else "-"  # plain: one request, one batch
                run |= {"setup": setup, "size": size, "concurrency": concurrency}
                if self.round is not None:
                    run["round"] = self.round
                self.results["runs"].append(run)
                print(
                    f"  {setup:<7} size {size:>2} x{concurrency:<3} {run['items_per_s']:>8.1f} items/s "
                    f"{run['requests_per_s']:>7.1f} req/s  p50 {run['p50_ms']:>7.1f} ms  p99 {run['p99_ms']:>7.1f} ms"
                    f"  batch {run['mean_batch_texts']}  errors {run['errors']}"
                    f"  loadgen cpu {run['loadgen_cpu_share']:.0%}",
                    flush=True,
                )

    def ceiling(self) -> None:
        """The bare model's best on this machine: `make ceiling`'s stored result (taken idle, cluster down) when
        there is a recent one; else taken now, with the cluster up, which its flags then say."""
        result, why = (None, "a --quick run takes its own") if self.quick else stored_ceiling()
        if result is None:
            print(f"  {why}: taking the ceiling now, with the cluster up (expect 'not idle' flags)", flush=True)
            path = self.out / "ceiling.json"
            rounds, duration = ("1", "1") if self.quick else (str(ROUNDS), "6")
            # Batch 16 and 64 (a 16-text request's batches are up to 64 texts); a quick run: the largest size only.
            sizes = str(max(self.sizes)) if self.quick else ",".join(str(s) for s in sorted({*self.sizes, 64}) if s > 1)
            subprocess.run(
                [
                    *(sys.executable, "-m", "loadtests.ceiling", "--json", str(path), "--sizes", sizes),
                    *("--rounds", rounds, "--duration", duration),
                    *(("--per-core-only",) if self.quick else ()),  # a smoke run of the plumbing, not a ceiling
                ],
                check=True,
                cwd=REPO_ROOT,
                stdout=subprocess.DEVNULL,
            )
            result, why = json.loads(path.read_text()), "taken during this run, with the cluster up"
        self.results["ceiling"] = result | {"source": why}
        for backend, sizes in result["best"].items():
            for size, row in sizes.items():
                print(f"  ceiling {backend:<5} batch {size:>2} {row['texts_per_s']:>8.1f} texts/s ({row['layout']})")
        for flag in result["flags"]:
            print(f"  ceiling FLAG: {flag}", flush=True)
        print(f"  ({why})", flush=True)

    def served_backend(self) -> str:
        """What the pinned model runs on now (GET /v1/models/{model})."""
        response = httpx.get(f"{self.settings.public_url}/v1/models/{MODEL}", headers=self.headers, timeout=30)
        return response.json().get("backend", "torch") if response.status_code == 200 else "torch"

    def push(self, directory: Path, name: str, version: str) -> str:
        """models push, as an operator would; the name pushed. A --quick run pushes under a name of its own
        (`<name>-quick`) and without the ONNX export (about 17 s a model here; `models push` has its own
        tests of it): its torch-only versions never stand in for the ones a full run measures on ONNX."""
        from cluster import models

        if self.quick:
            name = f"{name}-quick"
        models.push(self.settings, directory, name, version, onnx=not self.quick)
        return name

    def ondemand(self) -> None:
        """The default model's weights as a model the Serve config does not pin: the pool serves it."""
        from cluster.seed import default_model_dir

        name = self.push(default_model_dir(), ONDEMAND_MODEL, "1")
        url = f"{self.settings.public_url}/v1/embeddings"
        self.loadgen(url, max(self.levels), max(self.sizes), "fresh", name)  # loads it, warms
        self.measure("ondemand", url, model_metrics=False, model=name)

    def rerank(self) -> None:
        """A MiniLM-L6 cross-encoder (what cross-encoder/ms-marco-MiniLM-L-6-v2 is) on demand, and in-process."""
        import torch
        from transformers import AutoTokenizer, BertForSequenceClassification

        from cluster.seed import default_model_dir
        from serve_app.model_repository import Manifest, ManifestFile, sha256_of

        directory = self.out / "reranker"
        if not (directory / "config.json").exists():
            source = default_model_dir()
            torch.manual_seed(0)
            BertForSequenceClassification.from_pretrained(source, num_labels=1).save_pretrained(directory)
            AutoTokenizer.from_pretrained(source).save_pretrained(directory)
        # Versions are immutable: name this one by its files, so another build is another version.
        version = (
            "d"
            + Manifest(
                name=RERANK_MODEL,
                version="0",
                framework="transformers",
                task="rerank",
                dims=1,
                files=[
                    ManifestFile(path=p.relative_to(directory).as_posix(), size=p.stat().st_size, sha256=sha256_of(p))
                    for p in sorted(directory.rglob("*"))
                    if p.is_file()
                ],
                created=datetime.now(UTC),
            ).digest[:12]
        )
        self.rerank_model = f"{self.push(directory, RERANK_MODEL, version)}:{version}"
        sizes = ",".join(str(s) for s in self.sizes)
        result = subprocess.run(
            [
                *(sys.executable, "-m", "loadtests.raw_model", "--rerank", str(directory)),
                *("--sizes", sizes, "--duration", str(self.duration_s)),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
        )
        self.results["raw_rerank"] = json.loads(result.stdout.strip().splitlines()[-1])
        for size, row in self.results["raw_rerank"]["by_batch_size"].items():
            print(f"  raw rerank batch {size:>2}   {row['items_per_s']:>8.1f} pairs/s", flush=True)
        url = f"{self.settings.public_url}/v1/rerank"
        self.loadgen(url, max(self.levels), max(self.sizes), "rerank", self.rerank_model)  # loads it, warms
        self.measure("rerank", url, mode="rerank", model_metrics=False, model=self.rerank_model)

    def plain(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = ManagedProcess("bench-plain", self.settings.state_dir)
        process.start(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "loadtests.plain_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=REPO_ROOT,
        )
        try:
            if not wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/docs").status_code == 200, 120):
                raise RuntimeError(f"the plain app did not start:\n{process.log_tail()}")
            self.measure("plain", f"http://127.0.0.1:{port}/v1/embeddings", model_metrics=False)
        finally:
            process.stop()

    def fused(self) -> None:
        """Deploy the fused experiment beside the main application, measure it, then remove it."""
        from cluster.local import deploy
        from cluster.services import http_ok, load_serve_config
        from loadtests.fused_app import ROUTE_PREFIX, application_config

        config = load_serve_config(self.settings)
        config["applications"].append(application_config(self.settings.default_model))
        base = f"{self.settings.serve_url}{ROUTE_PREFIX}"
        try:
            deploy(self.settings, config)
            if not wait_until(lambda: http_ok(f"{base}/readyz", timeout_s=5), 180, interval_s=1.0):
                raise RuntimeError("the fused application did not become ready")
            self.loadgen(f"{base}/v1/embeddings", max(self.levels), max(self.sizes), "fresh")  # warm
            self.measure("fused", f"{base}/v1/embeddings")
        finally:
            deploy(self.settings)

    def backends(self) -> None:
        """The full stack with the pinned model on torch, then on ONNX Runtime, switched live."""
        self.interleaved({"full-torch": {"backend": "torch"}, "full-onnx": {"backend": "onnx"}}, {"backend": "auto"})

    def batch_wait(self) -> None:
        """The model's batch_wait_timeout_s at 5 ms (the default until this was measured) and at 0 (a batch
        takes what queued while the last forward pass ran, and an idle replica starts at once; the default
        now)."""
        self.interleaved(
            {"wait-5ms": {"batch_wait_timeout_s": 0.005}, "wait-0ms": {"batch_wait_timeout_s": 0.0}},
            {"batch_wait_timeout_s": 0.0},
        )

    def priority(self, job_items: int = 3000, clients: int = 8, size: int = 16) -> None:
        """Synchronous requests next to one large job, with the model's lanes off (one queue, first come first
        served), on (job chunks run only while no request waits) and on with half the batches for jobs while
        both wait (PRIORITY_VARIANTS), A B C A B C. Each variant measures the sync
        load alone, the job alone, then both at once: sync p95 during the job against alone, and the job's
        rate (its progress over the same window) during the sync load against alone."""
        from cluster.models import set_user_config

        url = f"{self.settings.public_url}/v1/embeddings"
        if not self.results["ceiling"]:  # to check sync + job against (a run with --setups priority alone)
            self.results["ceiling"] = stored_ceiling()[0] or {}
        try:
            for number in (1, 2):
                for label, changes in PRIORITY_VARIANTS.items():
                    set_user_config(self.settings, MODEL, **changes)
                    self.warm_replicas()
                    alone = self.loadgen(url, clients, size, "fresh")
                    solo_rate = self.job_rate(job_items)
                    shared_rate, during = self.job_rate(job_items, lambda: self.start_loadgen(url, clients, size))
                    row = {
                        "variant": label,
                        "round": number,
                        "sync_p95_alone_ms": alone["p95_ms"],
                        "sync_p95_during_job_ms": during["p95_ms"],
                        "sync_texts_per_s_alone": alone["items_per_s"],
                        "sync_texts_per_s_during_job": during["items_per_s"],
                        "job_texts_per_s_alone": solo_rate,
                        "job_texts_per_s_during_sync": shared_rate,
                        "sync_errors": alone["errors"] + during["errors"],
                    }
                    row["p95_during/alone"] = round(during["p95_ms"] / alone["p95_ms"], 3)
                    both = during["items_per_s"] + shared_rate
                    ceiling = best_of(self.results["ceiling"], self.results.get("served_backend", "torch"))
                    if ceiling and both > ceiling:  # the two together cannot beat the bare model
                        row["error"] = f"sync + job = {both:.1f} texts/s, above the ceiling {ceiling}"
                        print(f"  MEASUREMENT ERROR: {row['error']}", flush=True)
                    row["job_shared/solo"] = round(shared_rate / solo_rate, 3) if solo_rate else None
                    self.results.setdefault("priority", []).append(row)
                    print(
                        f"  round {number} {label:<9} sync p95 {alone['p95_ms']:>7.1f} ms alone, "
                        f"{during['p95_ms']:>7.1f} ms during the job ({row['p95_during/alone']}x); job "
                        f"{solo_rate:>6.1f} texts/s alone, {shared_rate:>6.1f} during sync ({row['job_shared/solo']})",
                        flush=True,
                    )
        finally:
            set_user_config(self.settings, MODEL, interactive_first=True, background_share=0.0)

    def door(self, points: tuple[tuple[int, int], ...] = ((1, 1), (1, 32), (16, 32))) -> None:
        """NGINX in front of Serve's proxy (its one hop through a handle to the gateway) and in front of each
        gateway replica's own HTTP port (Ray Serve's direct ingress, the default), switched between rounds, A B A B.
        Both doors are open only on a cluster with direct ingress (not INFER_SERVE_DIRECT_INGRESS=0); NGINX is
        left as nginx-sync keeps it (the replicas' ports, the proxy as their backup)."""
        from cluster.nodes import ingress_upstreams, live_upstreams, serve_details, sync_nginx_once

        direct = ingress_upstreams(self.settings, serve_details(self.settings))
        if not direct:
            why = "no gateway replica has a port of its own: the cluster runs without direct ingress"
            print(f"  skipped: {why}", flush=True)
            self.results["door"] = {"skipped": why}
            return
        doors = {"proxy": [f"{self.settings.serve_host}:{self.settings.serve_port}"], "direct": direct}
        url = f"{self.settings.public_url}/v1/embeddings"
        rows = []
        try:
            for number in range(1, ROUNDS + 1):
                for name, upstreams in doors.items():
                    sync_nginx_once(self.settings, upstreams)
                    time.sleep(1)
                    for size, concurrency in points:
                        run = self.loadgen(url, concurrency, size, "fresh")
                        rows.append({"door": name, "round": number, "size": size, "concurrency": concurrency} | run)
                        print(
                            f"  round {number} NGINX -> {name:<6} size {size:>2} x{concurrency:<3} "
                            f"{run['items_per_s']:>8.1f} items/s  p50 {run['p50_ms']:>7.1f} ms  "
                            f"p99 {run['p99_ms']:>7.1f} ms  errors {run['errors']}",
                            flush=True,
                        )
        finally:
            sync_nginx_once(self.settings, live_upstreams(self.settings) or direct)
        self.results["door"] = {"upstreams": doors, "runs": rows}

    def cold(self, idle_s: float = 60.0, window_s: float = 20.0, clients: int = 32, size: int = 16) -> None:
        """A 32-client burst after the cluster sat idle (no requests for idle_s), its first window_s against the
        window_s right after it (steady), twice. The pinned model's replicas are min_replicas: 2 = max_replicas
        on this machine, so idle costs no replica; this shows whether anything else is cold."""
        url = f"{self.settings.public_url}/v1/embeddings"
        duration = self.duration_s
        try:
            self.duration_s = window_s
            for number in (1, 2):
                time.sleep(idle_s)
                first = self.loadgen(url, clients, size, "fresh")
                steady = self.loadgen(url, clients, size, "fresh")
                row = {
                    "round": number,
                    "idle_s": idle_s,
                    "first_texts_per_s": first["items_per_s"],
                    "steady_texts_per_s": steady["items_per_s"],
                    "first_p99_ms": first["p99_ms"],
                    "steady_p99_ms": steady["p99_ms"],
                    "errors": first["errors"] + steady["errors"],
                    "first/steady": round(first["items_per_s"] / steady["items_per_s"], 3),
                }
                self.results.setdefault("cold", []).append(row)
                print(
                    f"  round {number}: after {idle_s:g} s idle, first {window_s:g} s {first['items_per_s']:>7.1f} "
                    f"texts/s, the next {window_s:g} s {steady['items_per_s']:>7.1f} ({row['first/steady']})",
                    flush=True,
                )
        finally:
            self.duration_s = duration

    def start_loadgen(self, url: str, concurrency: int, size: int) -> subprocess.Popen:
        self.fresh_start += 10**6
        command = [
            sys.executable, "-m", "loadtests.loadgen", url, "--concurrency", str(concurrency), "--size", str(size),
            "--duration", str(self.duration_s), "--mode", "fresh", "--start", str(self.fresh_start),
        ]  # fmt: skip
        env = {**os.environ, API_KEY_ENV: self.api_key}
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)

    def job_rate(self, items: int, beside=None):
        """A job of fresh texts: its rate in texts/s over one window of duration_s once it runs (its progress at
        the window's ends). With `beside` (starting a load generator), the window is that load's, and its
        result comes back too."""
        self.fresh_start += 10**6
        texts = next(fresh_batches(items, self.fresh_start + 5 * 10**8))
        api = f"{self.settings.public_url}/v1/jobs"
        job = httpx.post(api, json={"model": MODEL, "input": texts}, headers=self.headers, timeout=120).json()

        def progress() -> tuple[float, int, str]:
            view = httpx.get(f"{api}/{job['id']}", headers=self.headers, timeout=30).json()
            return time.perf_counter(), view["progress"]["done"], view["status"]

        deadline = time.monotonic() + 300
        while (sample := progress())[2] == "queued" or (sample[2] == "running" and sample[1] == 0):
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job['id']} did not start within 300 s")
            time.sleep(0.05)
        if sample[2] != "running":
            raise RuntimeError(f"job {job['id']} ended ({sample[2]}) before its rate could be measured")
        process = beside() if beside else None
        if process is not None:  # the job's window is the load's measured one, not its start-up
            assert process.stdout is not None
            while (line := process.stdout.readline()) and line.strip() != "measuring":
                pass
        began = progress()
        end = began[0] + self.duration_s
        last = began
        while last[2] == "running" and (last[0] < end if process is None else process.poll() is None):
            time.sleep(0.25)
            if process is not None and process.poll() is not None:
                break  # the load ended: the job's last sample is the one before
            last = progress()
        result = None
        if process is not None:
            out, _ = process.communicate(timeout=self.duration_s + 120)
            if process.returncode != 0 or not out.strip():
                raise RuntimeError(f"the load generator failed (exit {process.returncode})")
            result = json.loads(out.strip().splitlines()[-1])
        if last is began:  # the job ended before a second sample: too small a job for this window
            raise RuntimeError(f"job {job['id']} ended before a window could be measured; use a larger job")
        rate = (last[1] - began[1]) / (last[0] - began[0])
        httpx.delete(f"{api}/{job['id']}", headers=self.headers, timeout=30)  # what is left of it: not needed
        while progress()[2] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.2)
        return (round(rate, 2), result) if beside else round(rate, 2)

    def interleaved(self, variants: dict[str, dict], restore: dict, rounds: int = 2) -> None:
        """The full stack under each variant of the pinned model's user_config (set live), in rounds in the
        same order (A B A B), each round's points kept so the spread shows; `restore` afterwards."""
        from cluster.models import set_user_config

        try:
            for number in range(1, rounds + 1):
                for label, changes in variants.items():
                    set_user_config(self.settings, MODEL, **changes)
                    self.warm_replicas()
                    print(f"  round {number}: {label} {changes}", flush=True)
                    first = len(self.results["runs"])
                    self.measure(label, f"{self.settings.public_url}/v1/embeddings")
                    for run in self.results["runs"][first:]:
                        run["round"] = number
        finally:
            set_user_config(self.settings, MODEL, **restore)

    def warm_cache(self) -> None:
        texts = fixed_set(256)
        for i in range(0, len(texts), 64):
            httpx.post(
                f"{self.settings.public_url}/v1/embeddings",
                json={"model": MODEL, "input": texts[i : i + 64]},
                headers=self.headers,
                timeout=120,
            ).raise_for_status()

    def warm_replicas(self) -> None:
        """Load until the model deployment has scaled out, so every setup meets the same replicas."""
        self.loadgen(f"{self.settings.public_url}/v1/embeddings", max(self.levels), max(self.sizes), "fresh")
        time.sleep(METRICS_SETTLE_S)

    def jobs(self) -> None:
        texts = next(fresh_batches(self.job_items, self.fresh_start + 5 * 10**8))
        api = f"{self.settings.public_url}/v1/jobs"
        began = time.perf_counter()
        job = httpx.post(api, json={"model": MODEL, "input": texts}, headers=self.headers, timeout=120).json()
        while (status := httpx.get(f"{api}/{job['id']}", headers=self.headers, timeout=30).json())["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            time.sleep(0.1)
        elapsed = time.perf_counter() - began
        self.results["jobs"] = {
            "items": len(texts),
            "seconds": round(elapsed, 3),
            "status": status["status"],
            "items_per_s": round(len(texts) / elapsed, 2),
        }
        print(f"  jobs    {len(texts)} items     {len(texts) / elapsed:>8.1f} items/s ({status['status']})", flush=True)

    # -- reporting ------------------------------------------------------------------------

    def best(self, setup: str, size: int, concurrency: int | None = None) -> float:
        rows = [
            r
            for r in self.results["runs"]
            if r["setup"] == setup and r["size"] == size and (concurrency is None or r["concurrency"] == concurrency)
        ]
        return max((r["items_per_s"] for r in rows), default=0.0)

    def ratios(self) -> dict:
        big, top = max(self.sizes), max(self.levels)
        backend = self.results.get("served_backend", "torch")
        ceiling = best_of(self.results["ceiling"], backend)

        def ratio(a: float, b: float) -> float | None:
            return round(a / b, 3) if a and b else None

        return {
            f"full/ceiling ({backend}, size {big}, steady)": ratio(self.best("full", big), ceiling),
            f"full/torch ceiling (size {big}, steady)": ratio(
                self.best("full", big), best_of(self.results["ceiling"], "torch")
            ),
            f"full/plain (size {big}, {top} clients)": ratio(self.best("full", big, top), self.best("plain", big, top)),
            f"full/plain (size 1, {top} clients)": ratio(self.best("full", 1, top), self.best("plain", 1, top)),
            f"serve/ceiling ({backend}, size {big}, steady)": ratio(self.best("serve", big), ceiling),
            f"cached/plain (size {big}, {top} clients)": ratio(
                self.best("cached", big, top), self.best("plain", big, top)
            ),
            f"jobs/full (size {big}, saturation)": ratio(
                self.results["jobs"].get("items_per_s", 0.0), self.best("full", big)
            ),
            f"ondemand/full (size {big}, {top} clients)": ratio(
                self.best("ondemand", big, top), self.best("full", big, top)
            ),
            f"rerank/raw rerank (size {big}, saturation)": ratio(
                self.best("rerank", big),
                self.results["raw_rerank"].get("by_batch_size", {}).get(str(big), {}).get("items_per_s", 0.0),
            ),
        }

    def experiment_ratios(self) -> dict:
        """The ratios of the setups a default run leaves out (backends, batchwait, priority), where they ran."""
        big = max(self.sizes)
        measured = {r["setup"] for r in self.results["runs"]}
        pairs = {"full-onnx/full-torch": ("full-onnx", "full-torch"), "wait-0ms/wait-5ms": ("wait-0ms", "wait-5ms")}
        ratios = {
            f"{name} (size {big}, saturation)": round(self.best(a, big) / self.best(b, big), 3)
            for name, (a, b) in pairs.items()
            if {a, b} <= measured and self.best(b, big)
        }
        p50 = {}
        for setup in ("full", "plain"):
            single = [
                r["p50_ms"] for r in self.results["runs"] if (r["setup"], r["size"], r["concurrency"]) == (setup, 1, 1)
            ]
            if single:
                p50[setup] = min(single)
        if len(p50) == 2:
            ratios["full p50 - plain p50 (1 text, 1 client, best rounds), ms"] = round(p50["full"] - p50["plain"], 1)
        door = self.results.get("door", {}).get("runs", [])

        def door_best(name: str, size: int, concurrency: int, key: str, pick=max) -> float | None:
            values = [r[key] for r in door if (r["door"], r["size"], r["concurrency"]) == (name, size, concurrency)]
            return pick(values) if values else None

        for size, concurrency in ((16, 32), (1, 32)):
            direct, proxy = (door_best(d, size, concurrency, "items_per_s") for d in ("direct", "proxy"))
            if direct and proxy:
                ratios[f"NGINX->direct ingress/NGINX->proxy ({size} texts, {concurrency} clients)"] = round(
                    direct / proxy, 3
                )
        direct, proxy = (door_best(d, 1, 1, "p50_ms", min) for d in ("direct", "proxy"))
        if direct and proxy:
            ratios["p50 NGINX->proxy - NGINX->direct ingress (1 text, 1 client, best rounds), ms"] = round(
                proxy - direct, 1
            )
        if rows := self.results.get("cold"):
            ratios["first 20 s from idle/steady (32 clients, 16 texts, worse round)"] = min(
                r["first/steady"] for r in rows
            )
        for variant in PRIORITY_VARIANTS:
            rows = [r for r in self.results.get("priority", []) if r["variant"] == variant and "error" not in r]
            if rows:
                worst_p95 = max(r["p95_during/alone"] for r in rows)
                ratios[f"sync p95 during a job/alone ({variant}, worse round)"] = worst_p95
                ratios[f"job rate beside sync/alone ({variant}, worse round)"] = min(
                    r["job_shared/solo"] or 0.0 for r in rows
                )
        return ratios

    def machine(self) -> dict:
        from loadtests.ceiling import cpu_name

        cpu = cpu_name()
        memory_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        import ray
        import torch

        return {
            "cpu": cpu,
            "cores": __import__("os").cpu_count(),
            "memory_gib": round(memory_kb / 2**20, 1),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "torch": torch.__version__,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def chart(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.sizes) + 1, figsize=(6 * (len(self.sizes) + 1), 4.5))
        setups = ["plain", "serve", "full", "cached"]
        for ax, size in zip(axes, self.sizes, strict=False):
            for setup in setups:
                rows = sorted(
                    (r for r in self.results["runs"] if r["setup"] == setup and r["size"] == size),
                    key=lambda r: r["concurrency"],
                )
                ax.plot([r["concurrency"] for r in rows], [r["items_per_s"] for r in rows], marker="o", label=setup)
            backend = self.results.get("served_backend", "torch")
            if ceiling := best_of(self.results["ceiling"], backend):
                ax.axhline(ceiling, linestyle="--", color="grey", label=f"ceiling ({backend})")
            ax.set(title=f"{size} text(s) per request", xlabel="concurrent clients", ylabel="texts/s", xscale="log")
            ax.legend()
        ax = axes[-1]
        big, top = max(self.sizes), max(self.levels)
        rows = [
            next(
                (r for r in self.results["runs"] if r["setup"] == s and r["size"] == big and r["concurrency"] == top),
                None,
            )
            for s in setups
        ]
        for i, pct in enumerate(("p50_ms", "p95_ms", "p99_ms")):
            ax.bar(
                [j + i * 0.25 for j in range(len(setups))],
                [r[pct] if r else 0 for r in rows],
                width=0.25,
                label=pct.removesuffix("_ms"),
            )
        ax.set_xticks([j + 0.25 for j in range(len(setups))], setups)
        ax.set(title=f"latency, {big} texts x {top} clients", ylabel="ms")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    def markdown(self) -> str:
        m = self.results["machine"]
        lines = [
            f"Measured {m['when']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, "
            f"Ray {m['ray']}, torch {m['torch']}; {self.duration_s:g} s per point; command: "
            f"`{' '.join(['python -m loadtests.bench', *sys.argv[1:]])}`.",
            "",
            "| ratio | measured |",
            "| --- | --- |",
            *(f"| {k} | {self._shown_ratio(k, v)} |" for k, v in self.results["ratios"].items()),
            "",
            f"Ceiling: {self.results['ceiling'].get('source', 'not taken')}. The pinned model served on "
            f"{self.results.get('served_backend', 'torch')}.",
            "",
            *(f"- FLAG: {flag}" for flag in self.results.get("flags", [])),
            "",
            "| setup | round | texts/request | clients | texts/s | requests/s | p50 ms | p95 ms | p99 ms "
            "| mean batch | load generator CPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for backend, sizes in self.results["ceiling"].get("best", {}).items():
            for size, row in sizes.items():
                lines.append(
                    f"| ceiling {backend} ({row['layout']}) | best | {size} (batch) | - | {row['texts_per_s']} | - | - "
                    f"| - | - | {size} | - |"
                )
        for size, row in self.results["raw_rerank"].get("by_batch_size", {}).items():
            lines.append(
                f"| raw rerank | 1 | {size} pairs (batch) | - | {row['items_per_s']} | - | - | - | - | {size} | - |"
            )
        for r in self.results["runs"]:
            lines.append(
                f"| {r['setup']} | {r.get('round', 1)} | {r['size']} | {r['concurrency']} | {r['items_per_s']} | "
                f"{r['requests_per_s']} | "
                f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['mean_batch_texts']} | "
                f"{r['loadgen_cpu_share']:.0%} |"
            )
        j = self.results["jobs"]
        lines.append(f"| jobs | 1 | {j['items']} (one job) | - | {j['items_per_s']} | - | - | - | - | - | - |")
        lines += ["", "![throughput and latency](benchmarks.png)"]
        return "\n".join(lines)

    def _shown_ratio(self, name: str, value: float | None) -> str:
        if value is None:
            return "n/a"
        if is_above_ceiling(name, value):
            return f"{value}: above its own ceiling, a measurement error"
        return str(value)

    def run(self, setups: tuple[str, ...] = ALL_SETUPS) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["machine"] = self.machine()
        self.results["served_backend"] = self.served_backend()
        if "ceiling" in setups:
            print("ceiling: the bare model in-process, the best of every backend, layout and batch size", flush=True)
            self.ceiling()
        self.warm_replicas()
        if "cached" in setups:
            self.warm_cache()
        rounds = 1 if self.quick else ROUNDS
        for number in range(1, rounds + 1):
            self.round = number
            if "plain" in setups:
                print(f"plain (round {number}): FastAPI + uvicorn, model in-process", flush=True)
                self.plain()
            if "serve" in setups:
                print(f"serve (round {number}): Serve directly, every item a cache miss", flush=True)
                self.measure("serve", f"{self.settings.serve_url}/v1/embeddings")
            if "full" in setups:
                print(f"full (round {number}): through NGINX, every item a cache miss", flush=True)
                self.measure("full", f"{self.settings.public_url}/v1/embeddings")
            if "cached" in setups:
                print(f"cached (round {number}): through NGINX, every item a cache hit", flush=True)
                self.measure("cached", f"{self.settings.public_url}/v1/embeddings", mode="cached")
        self.round = None
        self.results["flags"] = spread_flags(self.results["runs"])
        if "fused" in setups:
            print("fused: gateway and model in one deployment (no handle hop), Serve directly, misses", flush=True)
            self.fused()
        if "backends" in setups:
            print(
                "backends: through NGINX, misses, the pinned model on torch and on ONNX Runtime, interleaved",
                flush=True,
            )
            self.backends()
        if "batchwait" in setups:
            print("batchwait: through NGINX, misses, the model's batch wait at 5 ms and at 0, interleaved", flush=True)
            self.batch_wait()
        if "cold" in setups:
            print("cold: 32 clients x 16 texts after a minute idle, the first 20 s against the next 20 s", flush=True)
            self.cold()
        if "door" in setups:
            print("door: NGINX in front of Serve's proxy, then of the gateway replicas' own ports, A B A B", flush=True)
            self.door()
        if "priority" in setups:
            print(
                "priority: 8 clients x 16 texts next to a 3,000-text job; lanes off, on, on with a job share",
                flush=True,
            )
            self.priority()
        if "jobs" in setups:
            print("jobs: the same kind of items as one asynchronous job", flush=True)
            self.jobs()
        if "ondemand" in setups:
            print("ondemand: the same weights served on demand by the multiplexed pool, through NGINX", flush=True)
            self.ondemand()
        if "rerank" in setups:
            print("rerank: a MiniLM-L6 cross-encoder, on demand through NGINX, every pair new", flush=True)
            self.rerank()
        ratios = self.ratios() | self.experiment_ratios()
        if set(ALL_SETUPS) <= set(setups):
            self.results["ratios"] = ratios
        else:  # a partial run: the ratios its setups measured
            self.results["ratios"] = {name: value for name, value in ratios.items() if value is not None}
        print("\nratios (measured side by side in this run):")
        for name, value in self.results["ratios"].items():
            print(f"  {name:<36} {self._shown_ratio(name, value)}")
        for flag in self.results["flags"]:
            print(f"  FLAG: {flag}")
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        if self.results["runs"]:  # an experiment alone (priority, cold) has no throughput points to chart
            self.chart(self.out / "chart.png")
            print(f"\nwrote {self.out / 'results.json'} and {self.out / 'chart.png'}")
        else:
            print(f"\nwrote {self.out / 'results.json'}")
        return self.results

    def publish(self) -> None:
        """Put this run's tables and chart into docs/benchmarks.md (between its markers)."""
        doc = DOC.read_text()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOC.write_text(doc[:start] + "\n" + self.markdown() + "\n" + doc[end:])
        (DOC.parent / "benchmarks.png").write_bytes((self.out / "chart.png").read_bytes())
        print(f"updated {DOC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: every setup, a second or two each")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--setups", default=",".join(ALL_SETUPS), help="a subset, for a quick comparison")
    parser.add_argument("--sizes", default=None, help="texts per request, e.g. 1,16")
    parser.add_argument("--levels", default=None, help="concurrent clients, e.g. 8,32")
    parser.add_argument("--duration", type=float, default=None, help="seconds per point")
    args = parser.parse_args()
    settings = get_cluster_settings()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO_ROOT / "loadtests" / "results" / f"bench-{stamp}"
    if args.quick:
        bench = Bench(settings, out, sizes=[1, 16], levels=[4], duration_s=1.5, job_items=64)
        bench.quick = True
    else:
        bench = Bench(settings, out, sizes=[1, 16], levels=[1, 8, 32], duration_s=8.0, job_items=2048)
    if args.sizes:
        bench.sizes = [int(v) for v in args.sizes.split(",")]
    if args.levels:
        bench.levels = [int(v) for v in args.levels.split(",")]
    if args.duration:
        bench.duration_s = args.duration
    setups = tuple(args.setups.split(","))
    partial = not set(ALL_SETUPS) <= set(setups)
    ready = httpx.get(f"{settings.public_url}/readyz", timeout=30)
    if ready.status_code != 200:
        sys.exit(f"the cluster is not ready ({ready.status_code}); run `make up` first")
    results = bench.run(setups)
    if errors := above_ceiling(results["ratios"]):
        message = f"measurement error: {', '.join(errors)} above 1.0 (the stack beat the bare model)"
        if not args.quick:  # a quick run is a smoke run of the bench: its points are too short to be figures
            sys.exit(f"{message}; not published")
        print(f"\n{message} (a --quick run: nothing is published from it)", flush=True)
    if not args.quick and not partial:
        bench.publish()


if __name__ == "__main__":
    main()
