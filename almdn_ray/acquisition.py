"""Acquisition: from per-detection uncertainties to per-image scores and a selection. Pure numpy.

Two forms give the same scores (DESIGN sections 4-5):

* the reference form, :func:`almdn_scores`, from one row per detection;
* the scalable form: :func:`summarize` turns each image's detections into one row of maxima, sums and
  sums of squares (what a distributed map writes), and :func:`pool_statistics` + :func:`strategy_scores`
  reduce any number of such rows exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "TERMS",
    "COMMITTEE_TERMS",
    "COMMITTEE_STRATEGIES",
    "DIVERSE_STRATEGIES",
    "STRATEGIES",
    "PoolStatistics",
    "Selection",
    "fill_unscored",
    "is_scored",
    "almdn_scores",
    "summarize",
    "detection_values",
    "summary_columns",
    "pool_statistics",
    "strategy_columns",
    "strategy_scores",
    "select_top",
    "select",
]

TERMS = ("loc_al", "loc_ep", "cls_al", "cls_ep")
COMMITTEE_TERMS = ("cls_mi", "loc_var")  # disagreement of MC-dropout passes / ensemble members per detection
COMMITTEE_STRATEGIES = ("mc_dropout", "ensemble")  # strategies that score with several predictions per image
DIVERSE_STRATEGIES = ("almdn_diverse",)  # AL-MDN's score, then a diverse batch on embeddings (almdn_ray.reduce)
Summaries = Mapping[str, np.ndarray]


def _zscore(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(values - mean) / std`` per column; a column with zero spread scores 0 (all its values are equal)."""
    out = np.zeros(np.broadcast_shapes(values.shape, mean.shape), dtype=np.float64)
    np.divide(values - mean, std, out=out, where=np.broadcast_to(std > 0, out.shape))
    return out


def _per_image_max(image_index: np.ndarray, values: np.ndarray, num_images: int) -> np.ndarray:
    """``[num_images, T]`` column maxima per image; ``-inf`` for images without rows."""
    result = np.full((num_images, values.shape[1]), -np.inf)
    np.maximum.at(result, image_index, values)
    return result


def _check_rows(image_index: np.ndarray, values: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    image_index = np.asarray(image_index, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(TERMS) or values.shape[0] != image_index.shape[0]:
        raise ValueError(
            f"values must be [M, {len(TERMS)}] ({', '.join(TERMS)}) for {image_index.shape[0]} "
            f"image indices, got {values.shape}"
        )
    if image_index.size and (image_index.min() < 0 or image_index.max() >= num_images):
        raise ValueError(f"image_index must lie in [0, {num_images}), got [{image_index.min()}, {image_index.max()}]")
    return image_index, values


def almdn_scores(image_index: np.ndarray, values: np.ndarray, num_images: int) -> np.ndarray:
    """AL-MDN scores from per-detection rows (the reference form).

    Args:
        image_index: ``[M]`` image of each detection, in ``[0, num_images)``.
        values: ``[M, 4]`` the detection's ``loc_al, loc_ep, cls_al, cls_ep``.
        num_images: pool size.

    Returns:
        ``[num_images]``: max over the four terms of the z-scored per-image maxima, where each term is
        normalised by its mean and population std over all M detections; ``-inf`` without detections.
    """
    image_index, values = _check_rows(image_index, values, num_images)
    if values.shape[0] == 0:
        return np.full(num_images, -np.inf)
    z = _zscore(_per_image_max(image_index, values, num_images), values.mean(axis=0), values.std(axis=0))
    scores = z.max(axis=1)
    scores[np.bincount(image_index, minlength=num_images) == 0] = -np.inf
    return scores


def summary_columns() -> list[str]:
    """Column names of the per-image summary rows, in order (the counts ``n_det``, ``committee_n`` are ints)."""
    stats = ("max", "sum", "sumsq")
    return (
        ["n_det"]
        + [f"{t}_{s}" for t in TERMS for s in stats]
        + ["entropy_max", "committee_n"]
        + [f"{t}_{s}" for t in COMMITTEE_TERMS for s in stats]
    )


def _term_columns(out: dict, image_index: np.ndarray, values: np.ndarray, names, num_images: int) -> None:
    maxima = _per_image_max(image_index, values, num_images)
    for j, term in enumerate(names):
        column = values[:, j]
        out[f"{term}_max"] = maxima[:, j]
        out[f"{term}_sum"] = np.bincount(image_index, weights=column, minlength=num_images)
        out[f"{term}_sumsq"] = np.bincount(image_index, weights=column * column, minlength=num_images)


def summarize(
    image_index: np.ndarray,
    values: np.ndarray,
    num_images: int,
    entropy: np.ndarray | None = None,
    committee: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """One summary row per image from per-detection rows (the map side of DESIGN section 5).

    Args:
        committee: optional ``(image_index [M'], values [M', 2])`` rows of the committee's detections with
            their ``cls_mi, loc_var`` (MC dropout, ensembles); without it those columns say "no detection".

    Returns:
        Columns of :func:`summary_columns`, each ``[num_images]``: ``n_det``; per term its ``_max``
        (``-inf`` without detections), ``_sum`` and ``_sumsq``; ``entropy_max`` (``-inf`` without detections);
        ``committee_n`` and the same three columns per committee term.
    """
    image_index, values = _check_rows(image_index, values, num_images)
    out: dict[str, np.ndarray] = {"n_det": np.bincount(image_index, minlength=num_images).astype(np.int64)}
    _term_columns(out, image_index, values, TERMS, num_images)
    entropy = np.full(image_index.shape[0], -np.inf) if entropy is None else np.asarray(entropy, np.float64)
    out["entropy_max"] = _per_image_max(image_index, entropy[:, None], num_images)[:, 0]
    c_index, c_values = committee if committee is not None else (np.zeros(0, np.int64), np.zeros((0, 2)))
    c_index, c_values = np.asarray(c_index, np.int64), np.asarray(c_values, np.float64).reshape(-1, 2)
    out["committee_n"] = np.bincount(c_index, minlength=num_images).astype(np.int64)
    _term_columns(out, c_index, c_values, COMMITTEE_TERMS, num_images)
    return out


def detection_values(detections: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten per-image detections (objects with ``loc_al … cls_ep, entropy`` arrays) into rows.

    Returns:
        ``(image_index [M], values [M, 4], entropy [M])`` for :func:`almdn_scores` / :func:`summarize`.
    """
    counts = [len(d.scores) for d in detections]
    image_index = np.repeat(np.arange(len(detections)), counts)
    if not detections or sum(counts) == 0:
        return image_index, np.zeros((0, len(TERMS))), np.zeros(0)
    values = np.stack(
        [np.concatenate([np.asarray(getattr(d, t), np.float64) for d in detections]) for t in TERMS], axis=1
    )
    entropy = np.concatenate([np.asarray(d.entropy, np.float64) for d in detections])
    return image_index, values, entropy


@dataclass(frozen=True)
class PoolStatistics:
    """Pool-wide mean and population std of each term over all detections, ``[4]`` each (float64)."""

    num_detections: int
    mean: np.ndarray
    std: np.ndarray


def pool_statistics(
    summaries: Summaries, order: np.ndarray | None = None, *, terms: Sequence[str] = TERMS, count: str = "n_det"
) -> PoolStatistics:
    """Reduce summary rows to the pool's detection statistics (float64 sums, taken in ``order`` when given).

    Summing in a fixed order (the pool reduce uses image-id order) makes the result independent of how the
    rows were sharded, to the last bit. ``terms`` and ``count`` pick the family: AL-MDN's four terms over
    ``n_det`` detections (default), or :data:`COMMITTEE_TERMS` over ``committee_n``.
    """

    def total(name: str) -> float:
        column = np.asarray(summaries[name])
        return float(np.sum(column if order is None else column[order], dtype=np.float64))

    detections = int(total(count))
    if detections == 0:
        zeros = np.zeros(len(terms))
        return PoolStatistics(0, zeros, zeros)
    mean = np.array([total(f"{t}_sum") for t in terms]) / detections
    variance = np.maximum(np.array([total(f"{t}_sumsq") for t in terms]) / detections - mean * mean, 0.0)
    return PoolStatistics(detections, mean, np.sqrt(variance))


def _term_strategy(
    terms: Sequence[str], family: Sequence[str] = TERMS, count: str = "n_det"
) -> Callable[..., np.ndarray]:
    """Max over ``terms`` of their per-image maxima, each z-scored by the pool statistics of ``family``."""
    indices = [family.index(t) for t in terms]

    def scores(summaries: Summaries, stats: PoolStatistics, rng: np.random.Generator, order) -> np.ndarray:
        best = np.full(len(summaries[count]), -np.inf)
        for term, j in zip(terms, indices):  # one column at a time: memory stays flat on huge pools
            np.maximum(
                best, _zscore(np.asarray(summaries[f"{term}_max"], np.float64), stats.mean[j], stats.std[j]), out=best
            )
        best[np.asarray(summaries[count]) == 0] = -np.inf
        return best

    scores.statistics = {"terms": tuple(family), "count": count}  # what strategy_scores reduces for it
    return scores


def _entropy(summaries: Summaries, stats: PoolStatistics, rng: np.random.Generator, order) -> np.ndarray:
    return np.asarray(summaries["entropy_max"], np.float64)


def _random(summaries: Summaries, stats: PoolStatistics, rng: np.random.Generator, order) -> np.ndarray:
    draws = rng.random(len(summaries["n_det"]))
    if order is None:
        return draws
    scores = np.empty_like(draws)
    scores[order] = draws  # the k-th image in id order gets the k-th draw, however rows arrive
    return scores


STRATEGIES: dict[str, Callable[..., np.ndarray]] = {
    "almdn": _term_strategy(TERMS),
    "almdn_diverse": _term_strategy(TERMS),  # its batch is composed in almdn_ray.reduce from these scores
    "random": _random,
    "entropy": _entropy,
    **{term: _term_strategy([term]) for term in TERMS},
    # MC dropout / ensemble: each disagreement term z-scored over the committee's detections, the larger one
    **{name: _term_strategy(COMMITTEE_TERMS, COMMITTEE_TERMS, "committee_n") for name in COMMITTEE_STRATEGIES},
}


def strategy_columns(strategy: str) -> list[str]:
    """The summary columns a strategy reads (the reduce loads only these from the score files)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    if strategy in COMMITTEE_STRATEGIES:
        return ["committee_n"] + [f"{t}_{s}" for t in COMMITTEE_TERMS for s in ("max", "sum", "sumsq")]
    if strategy == "entropy":
        return ["n_det", "entropy_max"]
    if strategy == "random":
        return ["n_det"]
    terms = TERMS if strategy in ("almdn", *DIVERSE_STRATEGIES) else (strategy,)
    return ["n_det"] + [f"{t}_{s}" for t in terms for s in ("max", "sum", "sumsq")]


def strategy_scores(
    strategy: str,
    summaries: Summaries,
    *,
    stats: PoolStatistics | None = None,
    seed: int = 0,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Score every summary row with a strategy (higher = more worth labelling), aligned with the rows.

    Args:
        strategy: a key of :data:`STRATEGIES` (``almdn``, ``random``, ``entropy``, or one term for ablations).
        summaries: summary columns of the whole pool (or of a chunk, with the pool's ``stats``).
        stats: pool statistics; computed from ``summaries`` (in ``order``) when None.
        seed: seeds ``random``.
        order: row positions sorted by image id (the reduce's canonical order).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    function = STRATEGIES[strategy]
    if stats is None and hasattr(function, "statistics"):  # random and entropy need no term statistics
        stats = pool_statistics(summaries, order, **function.statistics)
    return function(summaries, stats, np.random.default_rng(seed), order)


def select_top(scores: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the ``budget`` highest scores, highest first; ties go to the lower index; NaN and -inf last.

    A budget larger than the pool takes every index.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    key = -np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    budget = min(budget, key.shape[0])
    if budget == 0:
        return np.zeros(0, dtype=np.int64)
    if budget < key.shape[0]:
        threshold = np.partition(key, budget - 1)[budget - 1]
        candidates = np.flatnonzero(key <= threshold)  # every tie of the last place, in index order
    else:
        candidates = np.arange(key.shape[0])
    return candidates[np.argsort(key[candidates], kind="stable")][:budget].astype(np.int64)


@dataclass(frozen=True)
class Selection:
    """Selected images, best first: ``image_ids``, their ``scores`` and ``ranks`` (0 = best); when known,
    each pick's predicted ``classes`` (its most confident detection's; -1: none) and how many near-duplicates
    a diverse selection left out (``dropped_duplicates``)."""

    image_ids: np.ndarray
    scores: np.ndarray
    ranks: np.ndarray
    classes: np.ndarray | None = None
    dropped_duplicates: int = 0


def select_rows(
    order: np.ndarray, summaries: Summaries, budget: int, *, strategy: str = "almdn", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The pool reduce on rows in any order, given ``order`` (row positions sorted by image id).

    Returns:
        ``(rows, scores)`` of the ``budget`` best rows, best first; ties go to the lower image id.
    """
    scores = strategy_scores(strategy, summaries, seed=seed, order=order)
    top = fill_unscored(select_top(scores[order], budget), scores[order], seed)
    rows = order[top]
    return rows, scores[rows]


def is_scored(scores: np.ndarray) -> np.ndarray:
    """Which scores a strategy gave (not ``-inf`` or NaN, the marks of an image without a scored detection)."""
    scores = np.asarray(scores, np.float64)
    return ~(np.isnan(scores) | np.isneginf(scores))


def fill_unscored(top: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
    """Replace the picks that no score chose (``-inf`` or NaN: images without a scored detection) by a
    seeded random draw among all such images, instead of the lowest ids.

    Args:
        top: :func:`select_top`'s indices into ``scores``, best first.
        scores: in the reduce's canonical (image id) order, so the draw does not depend on the shards.
        seed: the selection's seed (the draw uses its own stream of it).
    """
    scored = is_scored(scores[top])
    missing = int((~scored).sum())
    if missing == 0:
        return top
    unscored = np.flatnonzero(~is_scored(scores))
    drawn = np.random.default_rng([seed, 0xF111]).permutation(unscored.shape[0])[:missing]
    return np.concatenate([top[scored], np.sort(unscored[drawn])]).astype(np.int64)


def select(
    image_ids: np.ndarray, summaries: Summaries, budget: int, *, strategy: str = "almdn", seed: int = 0
) -> Selection:
    """The pool reduce: score rows, take the top ``budget``; ties go to the lower image id.

    Rows may come in any order and from any number of shards: the result is the same to the last bit.
    """
    image_ids = np.asarray(image_ids)
    order = np.argsort(image_ids, kind="stable")
    if np.any(image_ids[order][1:] == image_ids[order][:-1]):
        raise ValueError("image_ids must be unique: an image was summarised twice")
    rows, scores = select_rows(order, summaries, budget, strategy=strategy, seed=seed)
    return Selection(image_ids[rows], scores, np.arange(rows.shape[0]))
