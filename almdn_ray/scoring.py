"""Scoring pool images: read by URI, detect, summarise per image (the map of DESIGN section 5). No Ray here.

The distributed scorer (``distributed/score_pool.py``) calls :func:`score_images` inside its actors; the
same function in a plain loop (:func:`score_table`) is the single-process reference.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from almdn_ray import acquisition, engine, storage
from almdn_ray.data.images import ImageReadError, read_image
from almdn_ray.data.transforms import eval_transform
from almdn_ray.model.detector import SSDGMM, ModelSpec
from almdn_ray.model.postprocess import PostprocessConfig

# The reduce side lives in almdn_ray.reduce (no torch); re-exported here for callers of the map side.
from almdn_ray.reduce import SCORE_SCHEMA, read_scores, select_from_scores

logger = logging.getLogger(__name__)

__all__ = ["SCORE_SCHEMA", "load_model", "score_images", "score_table", "read_scores", "select_from_scores"]


def load_model(spec: ModelSpec, weights_uri: str | None, device: torch.device | str = "cpu") -> SSDGMM:
    """Build the model and load a plain ``state_dict`` file (local or ``s3://``) into it, in eval mode."""
    model = spec.build()
    if weights_uri is not None:
        state = torch.load(io.BytesIO(storage.read_bytes(weights_uri)), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def score_images(
    model: SSDGMM,
    image_ids: Sequence[str],
    uris: Sequence[str],
    *,
    config: PostprocessConfig = PostprocessConfig(),
    worker: str = "local",
    members: Sequence[SSDGMM] = (),
    mc_passes: int = 0,
) -> dict[str, np.ndarray]:
    """Summary rows (``SCORE_SCHEMA``) for a batch of pool images; unreadable ones get ``error`` and no detections.

    Args:
        model: the scoring model (eval mode), on its device.
        image_ids, uris: the manifest rows of the batch.
        config: detection settings (the paper's scoring thresholds by default).
        members: further ensemble members: the committee columns then come from ``model`` + ``members``.
        mc_passes: T > 1: the committee columns come from T passes of ``model`` with its dropout on.
    """
    start = time.perf_counter()
    transform = eval_transform(model.image_size)
    images, readable, errors = [], [], [None] * len(uris)
    for position, uri in enumerate(uris):
        try:
            images.append(transform(read_image(str(uri))))
            readable.append(position)
        except (ImageReadError, OSError) as error:
            errors[position] = str(error)
            logger.warning("scoring skipped %s", error)
    readable = np.asarray(readable, np.int64)
    batch = torch.stack(images) if images else None
    detections = engine.predict(model, batch, config=config) if images else []
    index, values, entropy = acquisition.detection_values(detections)
    committee = None
    if images and (members or mc_passes > 1):
        models, passes = ([model, *members], 1) if members else ([model], mc_passes)
        voted = engine.predict_committee(models, batch, passes=passes, config=config)
        counts = [len(d.scores) for d in voted]
        c_values = np.zeros((0, 2))
        if sum(counts):
            c_values = np.stack(
                [np.concatenate([d.cls_mi.numpy() for d in voted]), np.concatenate([d.loc_var.numpy() for d in voted])],
                axis=1,
            ).astype(np.float64)
        committee = (readable[np.repeat(np.arange(len(voted)), counts)], c_values)
    summary = acquisition.summarize(readable[index], values, len(uris), entropy, committee)
    seconds = (time.perf_counter() - start) / max(len(uris), 1)
    return {
        "image_id": np.asarray(image_ids, dtype=object),
        **summary,
        "seconds": np.full(len(uris), seconds),
        "error": np.asarray(errors, dtype=object),
        "worker": np.full(len(uris), worker, dtype=object),
    }


def score_table(
    model: SSDGMM,
    manifest: pa.Table,
    *,
    batch_size: int = 16,
    config: PostprocessConfig = PostprocessConfig(),
    members: Sequence[SSDGMM] = (),
    mc_passes: int = 0,
) -> pa.Table:
    """Score a whole manifest in this process (the single-process reference and small-pool path)."""
    parts = []
    ids, uris = manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()
    for start in range(0, len(ids), batch_size):
        rows = score_images(
            model,
            ids[start : start + batch_size],
            uris[start : start + batch_size],
            config=config,
            members=members,
            mc_passes=mc_passes,
        )
        parts.append(pa.Table.from_pydict(rows, schema=SCORE_SCHEMA))
    return pa.concat_tables(parts) if parts else SCORE_SCHEMA.empty_table()
