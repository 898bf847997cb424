"""The ceiling: the best way to run the bare model on this machine, measured like a skeptic.

python -m loadtests.ceiling                                   # torch and onnx, batch 16 and 64, 2 rounds
python -m loadtests.ceiling --backends torch --sizes 16 --rounds 3 --duration 8 --json out.json

Every way to run the model in-process is a point: each backend (torch; ONNX Runtime on the export
`models push` makes) x each layout (1 process x all threads; N processes x 1 thread, N = cores) x
each batch size. The points run in rounds, in the same order each round (A B C A B C), so drift
hits every point alike; the report gives every round, the spread between them (flagged over 15%),
and the best layout per backend and batch size, which is the ceiling a stack is measured against.
Before each point the machine's CPUs are sampled for a second: a point taken while something else
ran is marked as such, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPREAD_FLAG = 0.15  # rounds of one point further apart than this are flagged
BUSY_FLAG = 0.10  # a machine busier than this before a point was not idle
START_TIMEOUT_S = 300.0  # loading and warming every worker of a point


@dataclass
class Point:
    backend: str
    processes: int
    threads: int
    size: int
    rounds: list[float] = field(default_factory=list)  # texts/s, one per round
    busy_before: list[float] = field(default_factory=list)  # the machine's CPU use before each round

    @property
    def layout(self) -> str:
        return f"{self.processes} proc x {self.threads} thr"

    @property
    def best(self) -> float:
        return max(self.rounds, default=0.0)

    @property
    def spread(self) -> float:
        """(max - min) / max over the rounds."""
        return (max(self.rounds) - min(self.rounds)) / max(self.rounds) if len(self.rounds) > 1 else 0.0

    @property
    def idle(self) -> bool:
        return all(busy <= BUSY_FLAG for busy in self.busy_before)


def cpu_busy(seconds: float = 1.0) -> float:
    """The share of all CPUs busy over `seconds` (from /proc/stat; 0.0 where it cannot be read)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return 0.0
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _worker(
    backend: str,
    model_dir: str,
    onnx_path: str | None,
    threads: int,
    size: int,
    duration: float,
    start,
    results,
    index: int,
) -> None:
    """One process of a point: load, warm, wait for the others, then embed fresh batches for `duration`."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from deployments.encoder import SentenceEncoder
    from loadtests.texts import fresh_batches

    torch.set_num_threads(threads)
    encoder = SentenceEncoder(
        Path(model_dir),
        forward_batch_size=64,
        backend=backend,
        onnx_path=Path(onnx_path) if onnx_path else None,
        threads=threads,
    )
    batches = fresh_batches(size, start=(index + 1) * 10**8 + size * 10**6 + int(time.time()) % 10**6)
    for _ in range(2):
        encoder.encode(next(batches))  # warm: allocator, kernels, thread pools
    start.wait(timeout=START_TIMEOUT_S)  # a sibling that died before this raises BrokenBarrierError here
    items, began = 0, time.perf_counter()
    while time.perf_counter() - began < duration:
        items += len(encoder.encode(next(batches)).token_counts)
    results[index] = items / (time.perf_counter() - began)


def measure(point: Point, model_dir: Path, onnx_path: Path | None, duration: float) -> float:
    context = mp.get_context("spawn")
    start = context.Barrier(point.processes)
    results = context.Manager().dict()
    workers = [
        context.Process(
            target=_worker,
            args=(
                point.backend,
                str(model_dir),
                str(onnx_path) if onnx_path else None,
                point.threads,
                point.size,
                duration,
                start,
                results,
                i,
            ),
        )
        for i in range(point.processes)
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + START_TIMEOUT_S + duration + 60
    try:
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.exitcode != 0:  # died (None: still running past the deadline)
                start.abort()  # the others stop waiting for it
                raise RuntimeError(
                    f"{point.backend} {point.layout} batch {point.size}: a worker "
                    f"{'hung' if worker.exitcode is None else f'exited {worker.exitcode}'}"
                )
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(10)
    return sum(results.values())


def onnx_export(model_dir: Path) -> tuple[Path, object]:
    """The same checked export `models push` stores (made here, so the ceiling needs no cluster)."""
    from deployments.onnx_backend import ONNX_FILE, exported_directory

    directory, difference, staging = exported_directory(model_dir, "embed")
    print(f"onnx: exported and checked (max difference from torch {difference:.1e})", flush=True)
    return directory / ONNX_FILE, staging


def cpu_name() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )


def run(
    backends: list[str],
    sizes: list[int],
    rounds: int,
    duration: float,
    model_dir: Path | None = None,
    per_core_only: bool = False,
) -> dict:
    from cluster.seed import default_model_dir

    model_dir = model_dir or default_model_dir()
    cores = os.cpu_count() or 1
    onnx_path, staging = onnx_export(model_dir) if "onnx" in backends else (None, None)
    layouts = ([] if per_core_only and cores > 1 else [(1, cores)]) + ([(cores, 1)] if cores > 1 else [])
    points = [Point(b, p, t, s) for b in backends for s in sizes for p, t in layouts]
    try:
        for number in range(1, rounds + 1):
            for point in points:
                busy = cpu_busy()
                value = measure(point, model_dir, onnx_path if point.backend == "onnx" else None, duration)
                point.rounds.append(value)
                point.busy_before.append(busy)
                note = "" if busy <= BUSY_FLAG else f"   (NOT IDLE before: {busy:.0%} of the CPUs busy)"
                print(
                    f"round {number}  {point.backend:<5} {point.layout:<14} batch {point.size:>3}  "
                    f"{value:8.1f} texts/s{note}",
                    flush=True,
                )
    finally:
        if staging is not None:
            staging.cleanup()
    return report(points, cores)


def report(points: list[Point], cores: int) -> dict:
    best: dict[str, dict[str, dict]] = {}
    for point in points:
        row = best.setdefault(point.backend, {}).get(str(point.size))
        if row is None or point.best > row["texts_per_s"]:
            best[point.backend][str(point.size)] = {"texts_per_s": round(point.best, 1), "layout": point.layout}
    flags = [
        f"{p.backend} {p.layout} batch {p.size}: rounds {', '.join(f'{r:.1f}' for r in p.rounds)} "
        f"spread {p.spread:.0%} (over {SPREAD_FLAG:.0%})"
        for p in points
        if p.spread > SPREAD_FLAG
    ] + [
        f"{p.backend} {p.layout} batch {p.size}: the machine was not idle before a round "
        f"({', '.join(f'{b:.0%}' for b in p.busy_before)} busy)"
        for p in points
        if not p.idle
    ]
    from datetime import UTC, datetime

    return {
        "cores": cores,
        "cpu": cpu_name(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "points": [
            asdict(p) | {"layout": p.layout, "best": round(p.best, 1), "spread": round(p.spread, 3)} for p in points
        ],
        "best": best,
        "ceiling": {size: max(b[size]["texts_per_s"] for b in best.values()) for size in next(iter(best.values()))},
        "flags": flags,
    }


def table(result: dict) -> str:
    lines = [
        "| backend | layout | batch | rounds (texts/s) | best | spread | idle before |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in result["points"]:
        idle = "yes" if all(b <= BUSY_FLAG for b in p["busy_before"]) else "NO"
        rounds = ", ".join(f"{r:.1f}" for r in p["rounds"])
        spread = f"{p['spread']:.0%}" + (" FLAG" if p["spread"] > SPREAD_FLAG else "")
        lines.append(
            f"| {p['backend']} | {p['layout']} | {p['size']} | {rounds} | {p['best']:.1f} | {spread} | {idle} |"
        )
    lines.append("")
    for backend, sizes in result["best"].items():
        for size, row in sizes.items():
            lines.append(f"- best {backend}, batch {size}: {row['texts_per_s']} texts/s ({row['layout']})")
    if "torch" in result["best"] and "onnx" in result["best"]:
        for size in result["best"]["torch"]:
            ratio = result["best"]["onnx"][size]["texts_per_s"] / result["best"]["torch"][size]["texts_per_s"]
            lines.append(f"- onnx / torch, batch {size}, best against best: {ratio:.2f}")
    for flag in result["flags"]:
        lines.append(f"- FLAG: {flag}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--sizes", default="16,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per point and round")
    parser.add_argument("--json", type=Path, help="write the result here too")
    parser.add_argument(
        "--per-core-only", action="store_true", help="only N processes x 1 thread (a smoke run: not a ceiling)"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    result = run(args.backends.split(","), sizes, args.rounds, args.duration, per_core_only=args.per_core_only)
    print()
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if result["flags"]:
        print(f"\n{len(result['flags'])} flag(s): read the points above with care", file=sys.stderr)


if __name__ == "__main__":
    main()
