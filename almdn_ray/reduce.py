"""The pool reduce (DESIGN section 5): read the score rows, compute pool statistics, select the budget.

Arrow and numpy only (no torch): the driver runs it over millions of rows without per-row Python objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from almdn_ray import acquisition, storage

__all__ = ["SCORE_SCHEMA", "read_scores", "select_from_scores"]

SCORE_SCHEMA = pa.schema(
    [("image_id", pa.string())]
    + [
        (name, pa.int64() if name.endswith("_n") or name == "n_det" else pa.float64())
        for name in acquisition.summary_columns()
    ]
    + [("seconds", pa.float64()), ("error", pa.string()), ("worker", pa.string())]
)  # seconds: this image's share of its batch's model time (read, detect, summarise)


def read_scores(folder: str, strategy: str | None = None) -> pa.Table:
    """Every Parquet file of a scores folder as one table; with ``strategy``, only the columns it needs."""
    files = storage.list_files(folder, pattern="*.parquet")
    if not files:
        raise FileNotFoundError(f"{folder} has no score files; run the SCORE stage first")
    schema = SCORE_SCHEMA
    if strategy is not None:
        wanted = ["image_id", *acquisition.strategy_columns(strategy), "error"]
        schema = pa.schema([SCORE_SCHEMA.field(name) for name in wanted])
    tables = []
    for uri in files:
        table = storage.read_parquet(uri, columns=schema.names)
        tables.append(table.select(schema.names).cast(schema))
    return pa.concat_tables(tables)


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


def select_from_scores(
    scores: pa.Table, budget: int, *, strategy: str = "almdn", seed: int = 0, exclude: Sequence[str] = ()
) -> acquisition.Selection:
    """The pool reduce over score rows: drop unreadable images (and ``exclude``), score, take ``budget``.

    Works on Arrow columns without per-row Python objects (10 million rows fit in a few GB).
    """
    keep = pc.is_null(scores.column("error"))
    if exclude:
        keep = pc.and_(keep, pc.invert(pc.is_in(scores.column("image_id"), pa.array(list(exclude), pa.string()))))
    if pc.sum(keep).as_py() != scores.num_rows:
        scores = scores.filter(keep)
    ids = scores.column("image_id")
    order = pc.sort_indices(ids).to_numpy()
    ordered = pc.take(ids, pa.array(order))
    if scores.num_rows > 1 and pc.any(pc.equal(ordered.slice(1), ordered.slice(0, scores.num_rows - 1))).as_py():
        raise ValueError("score rows repeat an image id: an image was scored twice; delete the scores and rerun")
    del ordered
    rows, values = acquisition.select_rows(order, _LazyColumns(scores), budget, strategy=strategy, seed=seed)
    chosen = np.asarray(pc.take(ids, pa.array(rows)).to_pylist(), dtype=object)
    return acquisition.Selection(chosen, values, np.arange(rows.shape[0]))
