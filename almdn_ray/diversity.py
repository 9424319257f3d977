"""Batches that are uncertain and diverse: the selection step of ``almdn_diverse`` (issue 15), on features.

The AL-MDN score ranks images one at a time, so its top-K takes every near-copy of a hard image. Here a
candidate pool (the top ``beta x budget`` by score) is reduced to ``budget`` images by a score-weighted
k-center greedy on image embeddings: each step takes the candidate that is farthest from everything chosen
or already labelled, weighted by its score, and never one closer than ``min_distance`` to those (a
near-duplicate). An optional target class distribution tilts each step towards classes the batch has too few
of.

Search: exact and blocked in numpy, no index. Each step updates every candidate's distance to the chosen set
with one matrix-vector product (``candidates x dims``), so a budget of 1,000 from 100,000 candidates of 128
dims is 1.3e10 multiply-adds, seconds on two cores, and the result is exact and repeatable; an approximate
index (faiss) would only pay off for the labelled set's first pass at millions of rows, and would add a native
dependency. Pure numpy, no Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["DiverseResult", "normalise", "diverse_subset", "class_histogram", "duplicate_groups"]


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so that squared distance = 2 - 2 cos; zero rows stay zero."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be [rows, dims], got shape {features.shape}")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def _min_distance_to(points: np.ndarray, others: np.ndarray, block: int) -> np.ndarray:
    """Each row of ``points``' Euclidean distance to its nearest row of ``others`` (both unit rows), in tiles of
    ``block x block`` (both sides blocked: the widened candidates beside a large labelled set hold one tile)."""
    nearest = np.full(points.shape[0], np.inf, np.float32)
    for start in range(0, points.shape[0], block):
        rows = slice(start, start + block)
        for other in range(0, others.shape[0], block):
            similarity = points[rows] @ others[other : other + block].T  # [block, block]
            distance = np.sqrt(np.maximum(2.0 - 2.0 * similarity.max(axis=1), 0.0))
            np.minimum(nearest[rows], distance, out=nearest[rows])
    return nearest


@dataclass(frozen=True)
class DiverseResult:
    """``picked``: candidate indices in pick order; ``dropped_duplicates``: candidates left out because they lay
    within ``min_distance`` of a pick or of a labelled image; ``class_counts``: the picks' predicted classes."""

    picked: np.ndarray
    dropped_duplicates: int
    class_counts: dict[int, int]


def diverse_subset(
    features: np.ndarray,
    scores: np.ndarray,
    budget: int,
    *,
    min_distance: float = 0.0,
    labelled: np.ndarray | None = None,
    score_power: float = 1.0,
    classes: np.ndarray | None = None,
    target: dict[int, float] | None = None,
    block: int = 2048,
    warn_short: bool = True,
) -> DiverseResult:
    """Pick ``budget`` of the candidates: uncertain, far from each other and from the labelled set.

    Args:
        features: ``[N, D]`` candidate embeddings (any scale: rows are normalised; distances are between unit
            vectors, 0 … 2, so ``min_distance`` 0.1 is a cosine similarity above 0.995).
        scores: ``[N]`` the candidates' acquisition scores (higher = more worth labelling); the weight of a
            candidate is its score rescaled to (0, 1] among the candidates, to the power ``score_power`` (0: plain
            k-center; the first pick is the best score either way).
        budget: how many to pick; fewer come back when the candidates run out of non-duplicates.
        min_distance: candidates nearer than this to a pick or to ``labelled`` are never picked.
        labelled: ``[L, D]`` embeddings of images already labelled (they count as picked, are not returned).
        classes: ``[N]`` each candidate's predicted class (the class of its most confident detection; -1: none);
            with ``target`` set, a candidate's weight is multiplied by how far its class lags behind its target
            share among the picks so far: ``(target_c + e) / (share_c + e)``, ``e`` = 1 / budget.
        target: class -> wanted share of the batch (normalised here); classes missing from it get no lean.
        block: candidates and labelled rows per tile when measuring distances to ``labelled`` (a tile holds
            ``block x block`` float32).
        warn_short: log a warning when fewer than ``budget`` come back (off for a caller that widens the candidates
            and tries again).
    """
    points = normalise(features)
    scores = np.asarray(scores, np.float64)
    count = points.shape[0]
    if scores.shape != (count,):
        raise ValueError(f"scores must have one value per candidate ({count}), got shape {scores.shape}")
    if not (budget >= 0 and min_distance >= 0):  # NaN too: it would pick nothing
        raise ValueError(f"budget and min_distance must be >= 0, got {budget} and {min_distance}")
    if target is not None and classes is None:
        raise ValueError("a class target needs each candidate's predicted class (classes)")
    finite = np.isfinite(scores)
    low = scores[finite].min() if finite.any() else 0.0
    span = (scores[finite].max() - low) if finite.any() else 0.0
    weight = np.where(finite, (scores - low) / span if span > 0 else 1.0, 0.0)
    weight[np.isposinf(scores)] = 1.0  # +inf ranks first (as in select_top); -inf and NaN: unscored, lowest weight
    weight = (0.05 + 0.95 * weight) ** score_power  # (0, 1]: the least uncertain candidate can still be picked
    if count == 0 or budget == 0:  # e.g. every unlabelled image unreadable: nothing to pick, whatever is labelled
        return DiverseResult(np.zeros(0, np.int64), 0, {})
    nearest = np.full(count, np.inf, np.float32)
    if labelled is not None and len(labelled):
        known = normalise(labelled)
        if known.shape[1] != points.shape[1]:
            raise ValueError(
                f"labelled embeddings have {known.shape[1]} dims, the candidates' {points.shape[1]}: they come from "
                "different scoring passes; delete the cycle's scores/ folder to rescore it"
            )
        nearest = _min_distance_to(points, known, block)
    shares: dict[int, float] = {}
    if target is not None:
        total = sum(target.values())
        if total <= 0 or any(v < 0 for v in target.values()):
            raise ValueError(f"class target shares must be >= 0 and not all 0, got {target}")
        shares = {int(c): v / total for c, v in target.items()}
        classes = np.asarray(classes, np.int64)
    picked: list[int] = []
    counts: dict[int, int] = {}
    available = np.ones(count, bool)
    epsilon = 1.0 / max(budget, 1)
    while len(picked) < budget:
        allowed = available & (nearest >= min_distance)
        if not allowed.any():
            break
        spread = np.where(np.isinf(nearest), 2.0, nearest)  # nothing chosen yet: every candidate equally far
        value = spread * weight
        if shares:
            done = max(len(picked), 1)
            lean = np.ones(count)
            for c, share in shares.items():
                lean[classes == c] = (share + epsilon) / (counts.get(c, 0) / done + epsilon)
            value = value * lean
        value = np.where(allowed, value, -np.inf)
        choice = int(np.argmax(value))  # ties: the lower index (the caller orders candidates by score)
        picked.append(choice)
        available[choice] = False
        if classes is not None:
            c = int(classes[choice])
            counts[c] = counts.get(c, 0) + 1
        distance = np.sqrt(np.maximum(2.0 - 2.0 * (points @ points[choice]), 0.0))
        np.minimum(nearest, distance, out=nearest)
    dropped = int((available & (nearest < min_distance)).sum()) if min_distance > 0 else 0
    if len(picked) < budget and warn_short:
        logger.warning(
            "diverse selection: only %d of %d candidates are not within min_distance %.3g of each other or of "
            "the labelled set; %d picked of a budget of %d (lower acquisition.min_distance, or raise "
            "acquisition.max_beta for more candidates)",
            len(picked), count, min_distance, len(picked), budget,
        )  # fmt: skip
    return DiverseResult(np.asarray(picked, np.int64), dropped, dict(sorted(counts.items())))


def class_histogram(classes: np.ndarray) -> dict[int, int]:
    """Per predicted class, how many of ``classes`` have it (-1: no confident detection)."""
    values, counts = np.unique(np.asarray(classes, np.int64), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


COSINE_TOLERANCE = 2e-6
"""Float32 rounding of a unit row's cosine with itself (0.99999994 and below, to ~1e-6 at 1,024 dims): pairs
this close to the cut-off count as within it, so ``max_distance`` 0 means identical (distance <= ~0.002)."""


def duplicate_groups(features: np.ndarray, max_distance: float, *, block: int = 2048) -> list[np.ndarray]:
    """Groups of rows whose embeddings lie within ``max_distance`` of another in the group (single linkage),
    largest first; rows with no near-duplicate are left out.

    Exact, in ``block x block`` tiles of the ``N^2 / 2`` dot products, joined in an array union-find a few edges
    at a time: per round, each row and column of a tile links to its first neighbour in another group (every
    such group merges, so the rounds halve them), until no pair of the tile is in two groups. Time and memory
    do not grow with the number of near-duplicate pairs: a video's thousands of near-copies of one scene cost
    about what as many distinct images do.
    """
    points = normalise(features)
    count = points.shape[0]
    parent = np.arange(count)  # each row's link towards its group's root (the group's lowest row)
    threshold = 1.0 - max_distance**2 / 2.0 - COSINE_TOLERANCE  # distance <= d  <=>  cosine >= 1 - d^2 / 2
    for start in range(0, count, block):
        rows = np.arange(start, min(start + block, count))
        for other in range(start, count, block):
            cols = np.arange(other, min(other + block, count))
            near = points[start : start + block] @ points[other : other + block].T >= threshold  # [block, block]
            if other == start:
                near &= rows[:, None] < cols[None, :]
            while True:
                near &= _roots(parent, rows)[:, None] != _roots(parent, cols)[None, :]  # pairs not joined yet
                linked_rows, linked_cols = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
                if not linked_rows.size:
                    break
                first_col = near[linked_rows].argmax(axis=1)
                first_row = near[:, linked_cols].argmax(axis=0)
                _join(
                    parent,
                    rows[np.concatenate([linked_rows, first_row])],
                    cols[np.concatenate([first_col, linked_cols])],
                )
    roots = _roots(parent, np.arange(count))
    order = np.argsort(roots, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(roots[order])) + 1)
    return sorted((g for g in groups if g.shape[0] > 1), key=lambda g: (-g.shape[0], g[0]))


def _roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The roots of ``nodes`` in the forest ``parent`` (a root is its own parent); their paths are compressed."""
    found = parent[nodes]
    while True:
        up = parent[found]
        if np.array_equal(up, found):
            break
        found = up
    parent[nodes] = found
    return found


def _join(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Union of the groups of each pair ``(a[i], b[i])``, all pairs at once: each round hooks every higher root to
    the lowest root it is paired with (parents only point down, so no cycles) until the pairs share roots."""
    while a.size:
        root_a, root_b = _roots(parent, a), _roots(parent, b)
        apart = root_a != root_b
        a, b, root_a, root_b = a[apart], b[apart], root_a[apart], root_b[apart]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
