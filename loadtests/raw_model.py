"""The ceiling: the model called in-process, in batches, with all cores. Prints one JSON line.

python -m loadtests.raw_model --sizes 1,16,64 --duration 5
python -m loadtests.raw_model --rerank DIR --sizes 16      # a cross-encoder: (query, document) pairs/s
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from cluster.seed import default_model_dir
from deployments.cross_encoder import CrossEncoder
from deployments.encoder import SentenceEncoder
from loadtests.texts import fresh_batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,16,64")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rerank", type=Path, default=None, help="a cross-encoder directory: score pairs instead")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.rerank is not None:
        scorer = CrossEncoder(args.rerank, forward_batch_size=64)

        def run(texts: list[str]) -> int:
            return len(scorer.score([(texts[0], t) for t in texts]).token_counts)
    else:
        encoder = SentenceEncoder(default_model_dir(), forward_batch_size=64)

        def run(texts: list[str]) -> int:
            return len(encoder.encode(texts).token_counts)

    results = {}
    for size in (int(s) for s in args.sizes.split(",")):
        batches = fresh_batches(size, start=size * 10**7)
        run(next(batches))  # warm
        items, began = 0, time.perf_counter()
        while time.perf_counter() - began < args.duration:
            items += run(next(batches))
        elapsed = time.perf_counter() - began
        results[str(size)] = {"items_per_s": round(items / elapsed, 2), "seconds": round(elapsed, 3)}
    print(json.dumps({"threads": torch.get_num_threads(), "by_batch_size": results}))


if __name__ == "__main__":
    main()
