"""Cost of the diverse selection step (issue 15) beside plain top-K, at pool scale.

    python bench/diversity.py [--rows 10000000] [--candidates 100000] [--budget 1000] [--dims 128]

Plain ``almdn``: the top ``budget`` of ``rows`` scores (``acquisition.select_top``). ``almdn_diverse``'s step:
the top ``candidates`` by the same scores, then ``diversity.diverse_subset`` on their float16 embeddings (the
score Parquet's type) down to ``budget``, with ``min_distance`` and a uniform class target. Prints seconds and
peak traced memory (numpy allocations) of each, measured in the same run, and their ratios. The embeddings of
the candidates are drawn here; at pool scale only the candidates' rows are read from the score files.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np


def measure(function):
    tracemalloc.start()
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak


def main() -> None:
    from almdn_ray.acquisition import select_top
    from almdn_ray.diversity import diverse_subset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--dims", type=int, default=128)
    parser.add_argument("--classes", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    scores = rng.standard_normal(args.rows)
    embeddings = rng.standard_normal((args.candidates, args.dims)).astype(np.float16)
    classes = rng.integers(0, args.classes, args.candidates)
    target = {c: 1.0 for c in range(args.classes)}

    plain, plain_s, plain_mb = measure(lambda: select_top(scores, args.budget))

    def diverse():
        candidates = select_top(scores, args.candidates)
        picked = diverse_subset(
            embeddings, scores[candidates], args.budget, min_distance=0.05, classes=classes, target=target
        ).picked
        return candidates[picked]

    chosen, diverse_s, diverse_mb = measure(diverse)
    assert len(plain) == len(chosen) == args.budget
    print(f"rows {args.rows:,}, candidates {args.candidates:,}, budget {args.budget:,}, dims {args.dims} (float16)")
    print(f"{'step':<34}{'seconds':>10}{'peak MiB':>12}")
    print(f"{'almdn (top-K)':<34}{plain_s:>10.2f}{plain_mb:>12.0f}")
    print(f"{'almdn_diverse (top-K + k-center)':<34}{diverse_s:>10.2f}{diverse_mb:>12.0f}")
    print(f"ratio diverse / plain: {diverse_s / plain_s:.1f}x time, {diverse_mb / max(plain_mb, 1e-9):.1f}x memory")


if __name__ == "__main__":
    main()
