"""A closed-loop HTTP load generator, run as its own process by the benchmark.

    python -m loadtests.loadgen URL --concurrency 32 --size 16 --duration 8 --mode fresh [--model M]
    python -m loadtests.loadgen .../v1/rerank --mode rerank --model my-reranker --size 16   # a query, 16 documents
Prints `measuring` when its measured window starts, then one JSON line: requests, items, errors,
seconds, latency percentiles, and this process's CPU.
The API key, if any, comes from $LOADGEN_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import time

import httpx
import numpy as np

from loadtests.texts import fixed_set, fresh_batches

MODEL = "all-minilm-l6-v2"
API_KEY_ENV = "LOADGEN_API_KEY"  # an environment variable, not an argument: `ps` shows arguments


async def run(
    url: str, concurrency: int, size: int, duration_s: float, mode: str, start: int, model: str = MODEL
) -> dict:
    if mode in ("fresh", "rerank"):
        batches = fresh_batches(size, start)
    else:
        pool = fixed_set(256)
        batches = ([pool[(i + j) % len(pool)] for j in range(size)] for i in itertools.count())
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    key = os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as client:

        async def worker(deadline: float) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                texts = next(batches)
                if mode == "rerank":  # one query and `size` documents, every pair new
                    body = {"model": model, "query": texts[0], "documents": texts}
                else:
                    body = {"model": model, "input": texts}
                response = await client.post(url, json=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors += 1

        await asyncio.gather(*(worker(time.perf_counter() + 0.5) for _ in range(min(concurrency, 4))))  # warm
        latencies.clear()
        print("measuring", flush=True)  # the measured window starts now (the bench lines other work up with it)
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        await asyncio.gather(*(worker(began + duration_s) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "requests": len(latencies),
        "items": len(latencies) * size,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "items_per_s": round(len(latencies) * size / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_share": round(cpu / elapsed, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--mode", choices=["fresh", "cached", "rerank"], default="fresh")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--start", type=int, default=0, help="first sentence number (fresh texts)")
    args = parser.parse_args()
    print(
        json.dumps(
            asyncio.run(run(args.url, args.concurrency, args.size, args.duration, args.mode, args.start, args.model))
        )
    )


if __name__ == "__main__":
    main()
