"""The ceiling: the model called in-process, in batches, with all cores. Prints one JSON line.

python -m loadtests.raw_model --sizes 1,16,64 --duration 5
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from cluster.seed import default_model_dir
from deployments.encoder import SentenceEncoder
from loadtests.texts import fresh_batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,16,64")
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    encoder = SentenceEncoder(default_model_dir(), forward_batch_size=64)
    results = {}
    for size in (int(s) for s in args.sizes.split(",")):
        batches = fresh_batches(size, start=size * 10**7)
        encoder.encode(next(batches))  # warm
        items, began = 0, time.perf_counter()
        while time.perf_counter() - began < args.duration:
            items += len(encoder.encode(next(batches)).token_counts)
        elapsed = time.perf_counter() - began
        results[str(size)] = {"items_per_s": round(items / elapsed, 2), "seconds": round(elapsed, 3)}
    print(json.dumps({"threads": torch.get_num_threads(), "by_batch_size": results}))


if __name__ == "__main__":
    main()
