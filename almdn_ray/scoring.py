"""Scoring pool images: read by URI, detect, summarise per image (the map of DESIGN section 5). No Ray here.

The distributed scorer (``distributed/score_pool.py``) calls :func:`score_images` inside its actors; the
same function in a plain loop (:func:`score_table`) is the single-process reference.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from almdn_ray import acquisition, engine, storage
from almdn_ray.data.images import ImageReadError, read_image
from almdn_ray.data.transforms import eval_transform
from almdn_ray.model.detector import SSDGMM, ModelSpec
from almdn_ray.model.postprocess import PostprocessConfig

logger = logging.getLogger(__name__)

__all__ = ["SCORE_SCHEMA", "load_model", "score_images", "score_table", "read_scores", "select_from_scores"]

SCORE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("n_det", pa.int64())]
    + [(name, pa.float64()) for name in acquisition.summary_columns()[1:]]
    + [("error", pa.string()), ("worker", pa.string())]
)


def load_model(spec: ModelSpec, weights_uri: str | None, device: torch.device | str = "cpu") -> SSDGMM:
    """Build the model and load a plain ``state_dict`` file (local or ``s3://``) into it, in eval mode."""
    model = spec.build()
    if weights_uri is not None:
        state = torch.load(io.BytesIO(storage.read_bytes(weights_uri)), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.to(device).eval()


def score_images(
    model: SSDGMM,
    image_ids: Sequence[str],
    uris: Sequence[str],
    *,
    config: PostprocessConfig = PostprocessConfig(),
    worker: str = "local",
) -> dict[str, np.ndarray]:
    """Summary rows (``SCORE_SCHEMA``) for a batch of pool images; unreadable ones get ``error`` and no detections.

    Args:
        model: the scoring model (eval mode), on its device.
        image_ids, uris: the manifest rows of the batch.
        config: detection settings (the paper's scoring thresholds by default).
    """
    transform = eval_transform(model.image_size)
    images, readable, errors = [], [], [None] * len(uris)
    for position, uri in enumerate(uris):
        try:
            images.append(transform(read_image(str(uri))))
            readable.append(position)
        except (ImageReadError, OSError) as error:
            errors[position] = str(error)
            logger.warning("scoring skipped %s", error)
    detections = engine.predict(model, torch.stack(images), config=config) if images else []
    index, values, entropy = acquisition.detection_values(detections)
    summary = acquisition.summarize(np.asarray(readable, np.int64)[index], values, len(uris), entropy)
    return {
        "image_id": np.asarray(image_ids, dtype=object),
        **summary,
        "error": np.asarray(errors, dtype=object),
        "worker": np.full(len(uris), worker, dtype=object),
    }


def score_table(
    model: SSDGMM, manifest: pa.Table, *, batch_size: int = 16, config: PostprocessConfig = PostprocessConfig()
) -> pa.Table:
    """Score a whole manifest in this process (the single-process reference and small-pool path)."""
    parts = []
    ids, uris = manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()
    for start in range(0, len(ids), batch_size):
        rows = score_images(model, ids[start : start + batch_size], uris[start : start + batch_size], config=config)
        parts.append(pa.Table.from_pydict(rows, schema=SCORE_SCHEMA))
    return pa.concat_tables(parts) if parts else SCORE_SCHEMA.empty_table()


def read_scores(folder: str) -> pa.Table:
    """Every Parquet file of a scores folder as one table."""
    files = storage.list_files(folder, pattern="*.parquet")
    if not files:
        raise FileNotFoundError(f"{folder} has no score files; run the SCORE stage first")
    tables = [storage.read_parquet(uri) for uri in files]
    return pa.concat_tables([t.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA) for t in tables])


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
    if pc.count_distinct(ids).as_py() != scores.num_rows:
        raise ValueError("score rows repeat an image id: an image was scored twice; delete the scores and rerun")
    order = pc.sort_indices(ids).to_numpy()
    rows, values = acquisition.select_rows(order, _LazyColumns(scores), budget, strategy=strategy, seed=seed)
    chosen = np.asarray(pc.take(ids, pa.array(rows)).to_pylist(), dtype=object)
    return acquisition.Selection(chosen, values, np.arange(rows.shape[0]))
