"""Cost of the diverse selection step (issues 15 and 26) beside plain top-K, at pool scale.

    python bench/diversity.py [--rows 10000000] [--candidates 32000] [--labelled 10000] [--budget 1000]
                              [--dims 128] [--near-copies 5000]

Plain ``almdn``: the top ``budget`` of ``rows`` scores (``acquisition.select_top``). ``almdn_diverse``'s step:
the top ``candidates`` by the same scores (default 32,000: ``max_beta`` x budget, as far as the reduce widens),
then ``diversity.diverse_subset`` on their float16 embeddings (the score Parquet's type) beside ``labelled``
labelled images' embeddings, down to ``budget``, with ``min_distance`` and a uniform class target; once with
today's distances to the labelled set (tiles blocked on both sides) and once with issue 15's (the labelled set
blocked, every candidate at once). Then ``diversity.duplicate_groups`` on ``near-copies`` near-copies of one
scene and on as many distinct images, today's array union-find beside issue 15's Python union loop. Prints
seconds and peak traced memory (numpy allocations beyond the inputs) of each, all measured in the same run.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np


def measure(function, *args):
    tracemalloc.start()
    start = time.perf_counter()
    result = function(*args)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak


def issue15_min_distance_to(points: np.ndarray, others: np.ndarray, block: int) -> np.ndarray:
    """Issue 15's distances to the labelled set, for comparison: every candidate against 8,192 labelled rows."""
    nearest = np.full(points.shape[0], np.inf, np.float32)
    for start in range(0, others.shape[0], 8192):
        similarity = points @ others[start : start + 8192].T  # [candidates, 8192]
        np.minimum(nearest, np.sqrt(np.maximum(2.0 - 2.0 * similarity.max(axis=1), 0.0)), out=nearest)
    return nearest


def issue15_duplicate_groups(features: np.ndarray, max_distance: float, block: int = 4096) -> list[np.ndarray]:
    """Issue 15's ``duplicate_groups``, for comparison: a Python union per near-duplicate pair."""
    from almdn_ray.diversity import normalise

    points = normalise(features)
    parent = np.arange(points.shape[0])

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    threshold = 1.0 - max_distance**2 / 2.0
    for start in range(0, points.shape[0], block):
        rows, cols = np.nonzero(points[start : start + block] @ points[start:].T >= threshold)
        for r, c in zip(rows + start, cols + start):
            if c > r and (a := root(int(r))) != (b := root(int(c))):
                parent[max(a, b)] = min(a, b)
    roots = np.array([root(i) for i in range(points.shape[0])])
    return [g for g in (np.flatnonzero(roots == r) for r in np.unique(roots)) if g.shape[0] > 1]


def main() -> None:
    from almdn_ray import diversity
    from almdn_ray.acquisition import select_top

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--candidates", type=int, default=32_000)
    parser.add_argument("--labelled", type=int, default=10_000)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--dims", type=int, default=128)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--near-copies", type=int, default=5000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    scores = rng.standard_normal(args.rows)
    embeddings = rng.standard_normal((args.candidates, args.dims)).astype(np.float16)
    labelled = rng.standard_normal((args.labelled, args.dims)).astype(np.float16)
    classes = rng.integers(0, args.classes, args.candidates)
    target = {c: 1.0 for c in range(args.classes)}

    def diverse():
        candidates = select_top(scores, args.candidates)
        picked = diversity.diverse_subset(
            embeddings, scores[candidates], args.budget, min_distance=0.05, labelled=labelled, classes=classes,
            target=target,
        ).picked  # fmt: skip
        return candidates[picked]

    rows = [("almdn (top-K)", *measure(select_top, scores, args.budget))]
    today = diversity._min_distance_to
    diversity._min_distance_to = issue15_min_distance_to
    rows.append(("almdn_diverse, labelled blocked (15)", *measure(diverse)))
    diversity._min_distance_to = today
    rows.append(("almdn_diverse, both blocked (26)", *measure(diverse)))
    assert len(rows[0][1]) == args.budget
    same = len(np.intersect1d(rows[1][1], rows[2][1])) / max(len(rows[2][1]), 1)

    scene = rng.standard_normal(args.dims)
    sets = {
        "near-copies": (scene + 1e-3 * rng.standard_normal((args.near_copies, args.dims))).astype(np.float16),
        "distinct": rng.standard_normal((args.near_copies, args.dims)).astype(np.float16),
    }
    for name, features in sets.items():
        before = measure(issue15_duplicate_groups, features, 0.05)
        after = measure(diversity.duplicate_groups, features, 0.05)
        assert sorted(g.tolist() for g in before[0]) == sorted(g.tolist() for g in after[0])
        rows += [(f"duplicates, {name}: Python loop (15)", *before), (f"duplicates, {name}: union-find (26)", *after)]

    print(
        f"rows {args.rows:,}, candidates {args.candidates:,}, labelled {args.labelled:,}, budget {args.budget:,}, "
        f"dims {args.dims} (float16); duplicates: {args.near_copies:,} images"
    )
    print(f"{'step':<44}{'seconds':>10}{'peak MiB':>12}")
    for name, _, seconds, peak in rows:
        print(f"{name:<44}{seconds:>10.2f}{peak:>12.0f}")
    (_, _, plain_s, plain_mb), (_, _, old_s, old_mb), (_, _, new_s, new_mb) = rows[:3]
    print(f"ratio diverse / plain: {new_s / plain_s:.1f}x time, {new_mb / max(plain_mb, 1e-9):.1f}x memory")
    print(
        f"ratio both blocked / labelled blocked: {new_s / old_s:.2f}x time, {new_mb / max(old_mb, 1e-9):.2f}x memory "
        f"({same:.0%} of the picks the same)"
    )
    copies_old, copies_new = rows[3], rows[4]
    print(f"ratio union-find / loop, near-copies: {copies_new[2] / copies_old[2]:.3f}x time, "
          f"{copies_new[3] / max(copies_old[3], 1e-9):.2f}x memory")  # fmt: skip


if __name__ == "__main__":
    main()
