"""The side-by-side benchmark: the same model and inputs, six ways, in one run on one machine.

    python -m loadtests.bench            # full run (a few minutes); needs `make up`
    python -m loadtests.bench --quick    # a smoke run of every setup (seconds each)

Setups: raw (model in-process, all cores), plain (FastAPI + uvicorn, model in-process), serve
(Serve directly, every item a cache miss), full (through NGINX, misses), cached (through NGINX,
every item a hit), jobs (the same items as one asynchronous job), ondemand (the same weights pushed
under another name, so the multiplexed ModelPool serves them, through NGINX, misses), rerank (a
MiniLM-L6 cross-encoder, the default model's encoder with a fresh one-label head, on demand through
NGINX /v1/rerank, every pair new, against the same cross-encoder in-process, all cores). One experiment is not in the
default run: fused (loadtests/fused_app.py, the gateway and the model in one deployment, reached
like serve; `--setups serve,fused`). The load generator is its own
process and reports the CPU it used. Writes results.json and chart.png to the results directory
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
DOC = REPO_ROOT / "docs" / "benchmarks.md"
ALL_SETUPS = ("raw", "plain", "serve", "full", "cached", "jobs", "ondemand", "rerank")
ONDEMAND_MODEL = "bench-ondemand"  # the default model's weights under a name the Serve config does not pin
RERANK_MODEL = "bench-reranker"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def is_above_ceiling(name: str, value: float | None) -> bool:
    """A ratio against the bare model ("<setup>/raw") above 1.0: the stack cannot beat the model it runs,
    so such a ratio is a measurement error (a ceiling taken badly, a noisy moment), not a result."""
    return "/raw" in name and value is not None and value > 1.0


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
        self.results: dict = {"runs": [], "raw": {}, "jobs": {}, "raw_rerank": {}}
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
                    time.sleep(METRICS_SETTLE_S)
                    after = self.batch_texts()
                    batches = after[1] - before[1]
                    run["mean_batch_texts"] = round((after[0] - before[0]) / batches, 2) if batches else "-"
                else:
                    run["mean_batch_texts"] = size if setup == "plain" else "-"  # plain: one request, one batch
                run |= {"setup": setup, "size": size, "concurrency": concurrency}
                self.results["runs"].append(run)
                print(
                    f"  {setup:<7} size {size:>2} x{concurrency:<3} {run['items_per_s']:>8.1f} items/s "
                    f"{run['requests_per_s']:>7.1f} req/s  p50 {run['p50_ms']:>7.1f} ms  p99 {run['p99_ms']:>7.1f} ms"
                    f"  batch {run['mean_batch_texts']}  errors {run['errors']}"
                    f"  loadgen cpu {run['loadgen_cpu_share']:.0%}",
                    flush=True,
                )

    def raw(self) -> None:
        sizes = ",".join(str(s) for s in self.sizes)
        result = subprocess.run(
            [sys.executable, "-m", "loadtests.raw_model", "--sizes", sizes, "--duration", str(self.duration_s)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
        )
        self.results["raw"] = json.loads(result.stdout.strip().splitlines()[-1])
        for size, row in self.results["raw"]["by_batch_size"].items():
            print(f"  raw     batch {size:>2}      {row['items_per_s']:>8.1f} items/s", flush=True)

    def ondemand(self) -> None:
        """The default model's weights as a model the Serve config does not pin: the pool serves it."""
        from cluster import models
        from cluster.seed import default_model_dir

        models.push(self.settings, default_model_dir(), ONDEMAND_MODEL, "1")
        url = f"{self.settings.public_url}/v1/embeddings"
        self.loadgen(url, max(self.levels), max(self.sizes), "fresh", ONDEMAND_MODEL)  # loads it, warms
        self.measure("ondemand", url, model_metrics=False, model=ONDEMAND_MODEL)

    def rerank(self) -> None:
        """A MiniLM-L6 cross-encoder (what cross-encoder/ms-marco-MiniLM-L-6-v2 is) on demand, and in-process."""
        import torch
        from transformers import AutoTokenizer, BertForSequenceClassification

        from cluster import models
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
        models.push(self.settings, directory, RERANK_MODEL, version)
        self.rerank_model = f"{RERANK_MODEL}:{version}"
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
        raw = self.results["raw"].get("by_batch_size", {}).get(str(big), {}).get("items_per_s", 0.0)

        def ratio(a: float, b: float) -> float | None:
            return round(a / b, 3) if a and b else None

        return {
            f"full/raw (size {big}, saturation)": ratio(self.best("full", big), raw),
            f"full/plain (size {big}, {top} clients)": ratio(self.best("full", big, top), self.best("plain", big, top)),
            f"full/plain (size 1, {top} clients)": ratio(self.best("full", 1, top), self.best("plain", 1, top)),
            f"serve/raw (size {big}, saturation)": ratio(self.best("serve", big), raw),
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
        """The ratios of the setups a default run leaves out (backends, batchwait), where they ran."""
        big = max(self.sizes)
        measured = {r["setup"] for r in self.results["runs"]}
        pairs = {"full-onnx/full-torch": ("full-onnx", "full-torch"), "wait-0ms/wait-5ms": ("wait-0ms", "wait-5ms")}
        return {
            f"{name} (size {big}, saturation)": round(self.best(a, big) / self.best(b, big), 3)
            for name, (a, b) in pairs.items()
            if {a, b} <= measured and self.best(b, big)
        }

    def machine(self) -> dict:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
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
            raw = self.results["raw"].get("by_batch_size", {}).get(str(size), {}).get("items_per_s")
            if raw:
                ax.axhline(raw, linestyle="--", color="grey", label=f"raw (batch {size})")
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
            f"Ray {m['ray']}, torch {m['torch']}; {self.duration_s:g} s per point; command: `make bench`.",
            "",
            "| ratio | measured |",
            "| --- | --- |",
            *(f"| {k} | {self._shown_ratio(k, v)} |" for k, v in self.results["ratios"].items()),
            "",
            "| setup | texts/request | clients | texts/s | requests/s | p50 ms | p95 ms | p99 ms | mean batch | "
            "load generator CPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for size, row in self.results["raw"]["by_batch_size"].items():
            lines.append(f"| raw | {size} (batch) | - | {row['items_per_s']} | - | - | - | - | {size} | - |")
        for size, row in self.results["raw_rerank"].get("by_batch_size", {}).items():
            lines.append(
                f"| raw rerank | {size} pairs (batch) | - | {row['items_per_s']} | - | - | - | - | {size} | - |"
            )
        for r in self.results["runs"]:
            lines.append(
                f"| {r['setup']} | {r['size']} | {r['concurrency']} | {r['items_per_s']} | {r['requests_per_s']} | "
                f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['mean_batch_texts']} | "
                f"{r['loadgen_cpu_share']:.0%} |"
            )
        j = self.results["jobs"]
        lines.append(f"| jobs | {j['items']} (one job) | - | {j['items_per_s']} | - | - | - | - | - | - |")
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
        if "raw" in setups:
            print("raw: the model in-process, all cores", flush=True)
            self.raw()
        if "plain" in setups:
            print("plain: FastAPI + uvicorn, model in-process", flush=True)
            self.plain()
        self.warm_replicas()
        if "serve" in setups:
            print("serve: Serve directly, every item a cache miss", flush=True)
            self.measure("serve", f"{self.settings.serve_url}/v1/embeddings")
        if "fused" in setups:
            print("fused: gateway and model in one deployment (no handle hop), Serve directly, misses", flush=True)
            self.fused()
        if "full" in setups:
            print("full: through NGINX, every item a cache miss", flush=True)
            self.measure("full", f"{self.settings.public_url}/v1/embeddings")
        if "backends" in setups:
            print(
                "backends: through NGINX, misses, the pinned model on torch and on ONNX Runtime, interleaved",
                flush=True,
            )
            self.backends()
        if "batchwait" in setups:
            print("batchwait: through NGINX, misses, the model's batch wait at 5 ms and at 0, interleaved", flush=True)
            self.batch_wait()
        if "cached" in setups:
            print("cached: through NGINX, every item a cache hit", flush=True)
            self.warm_cache()
            self.measure("cached", f"{self.settings.public_url}/v1/embeddings", mode="cached")
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
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        self.chart(self.out / "chart.png")
        print(f"\nwrote {self.out / 'results.json'} and {self.out / 'chart.png'}")
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
