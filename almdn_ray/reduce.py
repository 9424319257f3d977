"""The pool reduce (DESIGN section 5): read the score rows, compute pool statistics, select the budget.

Arrow and numpy only (no torch): the driver runs it over millions of rows without per-row Python objects.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from almdn_ray import acquisition, diversity, storage

logger = logging.getLogger(__name__)

__all__ = ["SCORE_SCHEMA", "Diversity", "read_scores", "read_embeddings", "embedding_matrix", "select_from_scores"]

SCORE_SCHEMA = pa.schema(
    [("image_id", pa.string())]
    + [
        (name, pa.int64() if name.endswith("_n") or name == "n_det" else pa.float64())
        for name in acquisition.summary_columns()
    ]
    + [("top_class", pa.int64()), ("embedding", pa.binary()), ("det_embedding", pa.binary())]
    + [("seconds", pa.float64()), ("error", pa.string()), ("worker", pa.string())]
)
"""One row per pool image. ``top_class``: the class of its most confident detection (-1: none);
``embedding``: its image embedding, ``dims`` float16 values as bytes (null when unreadable or embeddings are
off); ``det_embedding``: its most confident detections' embeddings, ``n x dims`` float16 as bytes (at most
:data:`MAX_OBJECT_EMBEDDINGS`); ``seconds``: its share of its batch's model time (read, detect, summarise)."""

MAX_OBJECT_EMBEDDINGS = 8  # per image: bounds the score files at ~4 KB per image with 256 dims


def read_scores(folder: str, strategy: str | None = None) -> pa.Table:
    """Every Parquet file of a scores folder as one table; with ``strategy``, only the columns it needs."""
    files = storage.list_files(folder, pattern="*.parquet")
    if not files:
        raise FileNotFoundError(f"{folder} has no score files; run the SCORE stage first")
    schema = SCORE_SCHEMA
    if strategy is not None:
        wanted = ["image_id", *acquisition.strategy_columns(strategy), "top_class", "error"]
        schema = pa.schema([SCORE_SCHEMA.field(name) for name in wanted])
    tables = []
    for uri in files:
        try:
            table = storage.read_parquet(uri, columns=schema.names)
        except (pa.ArrowInvalid, KeyError) as error:
            raise ValueError(
                f"{uri} lacks a score column {schema.names} needs ({error}): it was written by an older almdn-ray "
                "or another strategy; delete the cycle's scores/ folder (and its _SUCCESS) to rescore it"
            ) from error
        tables.append(table.select(schema.names).cast(schema))
    return pa.concat_tables(tables)


EMBEDDING_COLUMNS = ["image_id", "embedding", "det_embedding"]


def read_embeddings(folder: str, image_ids: Sequence[str] | pa.Array | None = None) -> pa.Table:
    """The embedding columns (``EMBEDDING_COLUMNS``) of the given images (None: all), from a scores folder,
    file by file and filtered as read: the reduce of ``almdn_diverse`` holds the candidates' embeddings, not
    the pool's."""
    where = None
    if image_ids is not None:
        wanted = image_ids if isinstance(image_ids, pa.Array) else pa.array(list(image_ids), pa.string())
        where = pc.is_in(pc.field("image_id"), wanted)
    schema = pa.schema([SCORE_SCHEMA.field(name) for name in EMBEDDING_COLUMNS])
    tables = [
        storage.read_parquet(uri, columns=EMBEDDING_COLUMNS, filters=where).select(EMBEDDING_COLUMNS).cast(schema)
        for uri in storage.list_files(folder, pattern="*.parquet")
    ]
    return pa.concat_tables(tables) if tables else schema.empty_table()


class _LazyColumns(Mapping):
    """Arrow columns as numpy on access, not kept: the reduce holds one column copy at a time."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __getitem__(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

    def __iter__(self):
        return iter(self.table.column_names)

    def __len__(self) -> int:
        return self.table.num_columns


@dataclass(frozen=True)
class Diversity:
    """The diverse step of ``almdn_diverse``: ``beta`` x budget candidates by score, ``min_distance`` between
    picks and from labelled images, ``features`` ``image`` or ``objects``, optional class ``target``
    (class index -> share)."""

    beta: float = 4.0
    min_distance: float = 0.05
    features: str = "image"
    target: dict[int, float] | None = None
    max_beta: float = 32.0  # fewer than the budget survive min_distance: the candidates double up to this


def embedding_matrix(column: pa.ChunkedArray | pa.Array, *, mean_of_rows: int = 0) -> np.ndarray:
    """``[N, dims]`` float32 from a binary column of float16 rows (``embedding``); null or empty rows are zeros.

    ``mean_of_rows=dims`` (``det_embedding``: ``n x dims`` per row): each row is the mean of its detections'
    embeddings. Reads the column's data buffer directly, without a Python object per row.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    array = array.cast(pa.large_binary())
    count = len(array)
    valid = ~np.asarray(array.is_null().to_numpy(zero_copy_only=False), bool)
    offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + count + 1]
    data = np.frombuffer(array.buffers()[2], np.float16) if array.buffers()[2] is not None else np.zeros(0, np.float16)
    lengths = np.where(valid, np.diff(offsets) // 2, 0)
    if not mean_of_rows:
        sizes = set(lengths[lengths > 0].tolist())
        if len(sizes) > 1:
            raise ValueError(f"embeddings of different widths {sorted(sizes)} in one score table; rescore the cycle")
        dims = sizes.pop() if sizes else 0
        out = np.zeros((count, dims), np.float32)
        rows = np.flatnonzero(lengths > 0)
        if dims and rows.size:
            starts = offsets[rows] // 2
            out[rows] = data[starts[:, None] + np.arange(dims)[None, :]]
        return out
    return _mean_rows(data, offsets, valid, mean_of_rows)


def _mean_rows(data: np.ndarray, offsets: np.ndarray, valid: np.ndarray, dims: int) -> np.ndarray:
    """Per row the mean of its ``n x dims`` float16 values (zeros for null rows and rows with none)."""
    out = np.zeros((len(valid), dims), np.float32)
    lengths = np.diff(offsets) // 2
    if dims == 0 or not lengths.any():
        return out
    if (lengths % dims).any():
        raise ValueError(f"det_embedding rows are not multiples of the embedding width {dims}; rescore the cycle")
    counts = lengths // dims
    detections = data[offsets[0] // 2 : offsets[-1] // 2].reshape(-1, dims).astype(np.float32)
    nonempty = np.flatnonzero(counts > 0)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]  # strictly increasing, ranges back to back
    out[nonempty] = np.add.reduceat(detections, starts, axis=0) / counts[nonempty, None]
    out[~valid] = 0
    return out


def select_from_scores(
    scores: pa.Table,
    budget: int,
    *,
    strategy: str = "almdn",
    seed: int = 0,
    exclude: Sequence[str] = (),
    diverse: Diversity = Diversity(),
    embeddings: Callable[[pa.Array], pa.Table] | None = None,
) -> acquisition.Selection:
    """The pool reduce over score rows: drop unreadable images (and ``exclude``), score, take ``budget``.

    Works on Arrow columns without per-row Python objects (10 million rows fit in a few GB). ``almdn_diverse``
    composes the batch from the top ``diverse.beta x budget`` by AL-MDN score (:func:`diversity.diverse_subset`);
    the rows of ``exclude`` that are in ``scores`` (labelled images, scored for this) count as already picked.
    Its embeddings come from ``scores`` when it has them, else from ``embeddings(image_ids)`` (for example
    :func:`read_embeddings` of the scores folder), asked for the candidates and labelled images only.
    """
    keep = pc.is_null(scores.column("error"))
    labelled = None
    if exclude:
        excluded = pc.is_in(scores.column("image_id"), pa.array(list(exclude), pa.string()))
        if strategy in acquisition.DIVERSE_STRATEGIES:
            labelled = scores.filter(pc.and_(keep, excluded))
        keep = pc.and_(keep, pc.invert(excluded))
    if pc.sum(keep).as_py() != scores.num_rows:
        scores = scores.filter(keep)
    ids = scores.column("image_id")
    order = pc.sort_indices(ids).to_numpy()
    ordered = pc.take(ids, pa.array(order))
    if scores.num_rows > 1 and pc.any(pc.equal(ordered.slice(1), ordered.slice(0, scores.num_rows - 1))).as_py():
        raise ValueError("score rows repeat an image id: an image was scored twice; delete the scores and rerun")
    del ordered
    if strategy in acquisition.DIVERSE_STRATEGIES:
        rows, values, dropped = _diverse_rows(order, scores, budget, seed, diverse, labelled, embeddings)
    else:
        rows, values = acquisition.select_rows(order, _LazyColumns(scores), budget, strategy=strategy, seed=seed)
        dropped = 0
    chosen = np.asarray(pc.take(ids, pa.array(rows)).to_pylist(), dtype=object)
    classes = None
    if "top_class" in scores.column_names:
        picked = pc.take(scores.column("top_class"), pa.array(rows))
        classes = pc.fill_null(picked, -1).to_numpy(zero_copy_only=False)  # null: not scored (random)
    return acquisition.Selection(chosen, values, np.arange(rows.shape[0]), classes, dropped)


def _features(table: pa.Table, kind: str, embeddings: Callable[[pa.Array], pa.Table] | None) -> np.ndarray:
    """The rows' features for the diverse step: image embeddings, or the mean of the detections' (an image
    without a confident detection falls back to its image embedding)."""
    if "embedding" not in table.column_names:
        if embeddings is None:
            raise ValueError("almdn_diverse needs the score rows' embeddings: pass embeddings= or their columns")
        ids = table.column("image_id")
        found = embeddings(ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids)
        table = found.take(pc.index_in(ids, found.column("image_id")))  # in the rows' order; none found: null
    images = embedding_matrix(table.column("embedding"))
    if images.shape[1] == 0 and table.num_rows:
        raise ValueError(
            "the score files carry no embeddings (acquisition.embedding_dims was 0 when they were written); "
            "set embedding_dims > 0 and delete the cycle's scores/ folder to rescore it"
        )
    if kind == "image":
        return images
    objects = embedding_matrix(table.column("det_embedding"), mean_of_rows=images.shape[1])
    has = np.linalg.norm(objects, axis=1) > 0
    return np.where(has[:, None], diversity.normalise(objects), images)


def _diverse_rows(
    order: np.ndarray,
    scores: pa.Table,
    budget: int,
    seed: int,
    diverse: Diversity,
    labelled: pa.Table | None,
    embeddings: Callable[[pa.Array], pa.Table] | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    values = acquisition.strategy_scores("almdn", _LazyColumns(scores), seed=seed, order=order)
    known = None
    if labelled is not None and labelled.num_rows and scores.num_rows:  # no candidates: no labelled set to read
        known = _features(labelled, diverse.features, embeddings)
    wanted = min(scores.num_rows, math.ceil(diverse.beta * budget))
    most = min(scores.num_rows, max(wanted, math.ceil(diverse.max_beta * budget)))
    while True:
        top = acquisition.fill_unscored(acquisition.select_top(values[order], wanted), values[order], seed)
        candidates = order[top]  # best first: diverse_subset breaks ties towards the better score
        table = scores.take(pa.array(candidates))
        classes = table.column("top_class").to_numpy(zero_copy_only=False)
        result = diversity.diverse_subset(
            _features(table, diverse.features, embeddings),
            values[candidates],
            budget,
            min_distance=diverse.min_distance,
            labelled=known,
            classes=classes,
            target=diverse.target,
            warn_short=wanted >= most,
        )
        if len(result.picked) >= budget or wanted >= most:
            break
        logger.info(
            "almdn_diverse: %d of %d candidates are farther than min_distance %.3g from the rest and the labelled "
            "images; widening to the top %d by score",
            len(result.picked), wanted, diverse.min_distance, min(most, 2 * wanted),
        )  # fmt: skip
        wanted = min(most, 2 * wanted)
    logger.info(
        "almdn_diverse: %d of %d candidates picked; %d near-duplicates left out (of each other or of %d labelled)",
        len(result.picked), len(candidates), result.dropped_duplicates, 0 if known is None else len(known),
    )  # fmt: skip
    rows = candidates[result.picked]
    return rows, values[rows], result.dropped_duplicates
