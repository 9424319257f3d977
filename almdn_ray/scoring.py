"""Scoring pool images: read by URI, detect, summarise per image (the map of DESIGN section 5). No Ray here.

Two steps: :func:`decode_images` (read, decode, resize to the model's input: CPU work) and the model pass
with the per-image summary (:func:`score_images`). The distributed scorer (``distributed/score_pool.py``)
runs the first as Ray Data CPU tasks and the second in its model actors (or both in the actors); the same
functions in a plain loop (:func:`score_table`) are the single-process reference.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torchvision.transforms import v2

from almdn_ray import acquisition, engine, storage
from almdn_ray.data.images import ImageReadError, read_image
from almdn_ray.data.records import Prediction
from almdn_ray.model.anchors import make_box_coder
from almdn_ray.model.detector import SSDGMM, ModelSpec
from almdn_ray.model.embeddings import Embedder
from almdn_ray.model.postprocess import PostprocessConfig, image_summaries, postprocess_batch, rows_per_image

# The reduce side lives in almdn_ray.reduce (no torch); re-exported here for callers of the map side.
from almdn_ray.reduce import MAX_OBJECT_EMBEDDINGS, SCORE_SCHEMA, read_scores, select_from_scores

logger = logging.getLogger(__name__)

__all__ = [
    "SCORE_SCHEMA", "MAX_OBJECT_EMBEDDINGS", "Embedder", "load_model", "decode_images", "score_images",
    "detect_records", "score_table", "read_scores", "select_from_scores",
]  # fmt: skip


def load_model(spec: ModelSpec, weights_uri: str | None, device: torch.device | str = "cpu") -> SSDGMM:
    """Build the model and load a plain ``state_dict`` file (local or ``s3://``) into it, in eval mode.

    The backbone's ImageNet file is not read: the trained weights replace it.
    """
    model = spec.build()
    if weights_uri is not None:
        state = torch.load(io.BytesIO(storage.read_bytes(weights_uri)), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return engine.prepare_for_device(model, device).eval()


def decode_images(uris: Sequence[str], image_size: int) -> tuple[np.ndarray, list[str | None]]:
    """Read, decode and resize images to the model's input.

    Returns:
        ``[N, 3, S, S]`` uint8 RGB (zeros where unreadable) and, per image, None or why it was unreadable.
    """
    resize = v2.Resize((image_size, image_size), antialias=True)
    images = np.zeros((len(uris), 3, image_size, image_size), np.uint8)
    errors: list[str | None] = [None] * len(uris)
    for position, uri in enumerate(uris):
        try:
            images[position] = resize(read_image(str(uri))).numpy()
        except (ImageReadError, OSError) as error:
            errors[position] = str(error)
            logger.warning("scoring skipped %s", error)
    return images, errors


@torch.no_grad()
def score_images(
    model: SSDGMM,
    image_ids: Sequence[str],
    uris: Sequence[str] | None = None,
    *,
    decoded: tuple[np.ndarray, Sequence[str | None]] | None = None,
    config: PostprocessConfig = PostprocessConfig(),
    worker: str = "local",
    members: Sequence[SSDGMM] = (),
    mc_passes: int = 0,
    bf16: bool = False,
    embedder: Embedder | None = None,
) -> dict[str, np.ndarray]:
    """Summary rows (``SCORE_SCHEMA``) for a batch of pool images; unreadable ones get ``error`` and no detections.

    Args:
        model: the scoring model (eval mode), on its device.
        image_ids, uris: the manifest rows of the batch (``uris`` are read here unless ``decoded`` is given).
        decoded: :func:`decode_images`' output for these rows, when it ran elsewhere.
        config: detection settings (the paper's scoring thresholds by default).
        members: further ensemble members: the committee columns then come from ``model`` + ``members``.
        mc_passes: T > 1: the committee columns come from T passes of ``model`` with its dropout on.
        bf16: forward passes under bf16 autocast (the summary is computed in float32 / float64).
        embedder: also write each image's embedding and its detections' (from the same forward pass).
    """
    start = time.perf_counter()
    pixels, errors = decoded if decoded is not None else decode_images(uris, model.image_size)
    errors = [None if e is None or e != e else str(e) for e in errors]  # Arrow may hand back NaN for null
    readable = np.asarray([i for i, e in enumerate(errors) if e is None], np.int64)
    empty = acquisition.summarize(np.zeros(0, np.int64), np.zeros((0, len(acquisition.TERMS))), len(image_ids))
    rows = {k: v.astype(np.int64 if k in _INT_COLUMNS else np.float64) for k, v in empty.items()}  # no detection
    top_class = np.full(len(image_ids), -1, np.int64)
    image_bytes = np.full(len(image_ids), None, dtype=object)
    object_bytes = np.full(len(image_ids), None, dtype=object)
    if len(readable):
        device = next(model.parameters()).device
        batch = upload(np.ascontiguousarray(pixels[readable]), device)
        columns, embedded = _device_rows(model, batch, config, bf16, embedder, members, mc_passes)
        top_class[readable] = columns.pop("top_class")
        for name, values in columns.items():
            rows[name][readable] = values
        if embedded is not None:
            image_rows, object_rows, counts = embedded
            for j, (position, objects) in enumerate(zip(readable, np.split(object_rows, np.cumsum(counts)[:-1]))):
                image_bytes[position] = image_rows[j].tobytes()
                object_bytes[position] = objects.tobytes()
    seconds = (time.perf_counter() - start) / max(len(image_ids), 1)
    return {
        "image_id": np.asarray(image_ids, dtype=object),
        **rows,
        "top_class": top_class,
        "embedding": image_bytes,
        "det_embedding": object_bytes,
        "seconds": np.full(len(image_ids), seconds),
        "error": np.asarray(errors, dtype=object),
        "worker": np.full(len(image_ids), worker, dtype=object),
    }


def upload(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """``[N, 3, S, S]`` uint8 -> float in [0, 1] on ``device`` (as ``ToDtype(float32, scale=True)``): on CUDA
    from pinned memory with a non-blocking copy, converted on the device (a quarter of the bytes cross)."""
    host = torch.from_numpy(pixels)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True).float().div_(255.0)


def _device_rows(model, batch, config, bf16, embedder, members, mc_passes):
    """The summary columns of a batch of readable images, computed on the model's device and copied to the
    host once: ``({column: [N] numpy}, embeddings or None)``. No loop over the images."""
    box_coder = make_box_coder()
    image_size = tuple(batch.shape[-2:])
    num = batch.shape[0]
    if embedder is None:
        outputs, features = engine.forward(model, batch, bf16=bf16), None
    else:
        outputs, features = engine.forward(model, batch, bf16=bf16, with_features=True)
    found = postprocess_batch(outputs, box_coder=box_coder, image_size=image_size, config=config)
    values = torch.stack([found.loc_al, found.loc_ep, found.cls_al, found.cls_ep], dim=1)  # [M, 4]
    device_columns = image_summaries(found.image, values, num, acquisition.TERMS)
    counts = rows_per_image(found.image, num)
    starts = counts.cumsum(0) - counts  # each image's first row: rows sort by image, then score
    device_columns["n_det"] = counts
    entropy_max = torch.full((num,), -math.inf, dtype=torch.float64, device=batch.device)
    device_columns["entropy_max"] = entropy_max.scatter_reduce(0, found.image, found.entropy.double(), reduce="amax")
    first = starts.clamp(max=max(found.labels.numel() - 1, 0))
    labels = found.labels if found.labels.numel() else torch.zeros(1, dtype=torch.long, device=batch.device)
    device_columns["top_class"] = torch.where(counts > 0, labels[first], -1)
    if members or mc_passes > 1:
        models, passes = ([model, *members], 1) if members else ([model], mc_passes)
        voted = engine.committee_batch(models, batch, passes=passes, config=config, bf16=bf16)
        c_values = torch.stack([voted.cls_mi, voted.loc_var], dim=1)
        device_columns.update(image_summaries(voted.image, c_values, num, acquisition.COMMITTEE_TERMS))
        device_columns["committee_n"] = rows_per_image(voted.image, num)
    names = list(device_columns)
    packed = torch.stack([device_columns[n].double() for n in names], dim=1).cpu().numpy()  # the one copy back
    columns = {n: packed[:, j].astype(np.int64) if n in _INT_COLUMNS else packed[:, j] for j, n in enumerate(names)}
    if embedder is None:
        return columns, None
    most = min(embedder.max_objects, MAX_OBJECT_EMBEDDINGS)  # bounds the score files, as the schema says
    rank = torch.arange(found.image.numel(), device=batch.device) - starts[found.image]
    chosen = rank < most  # the first (most confident) detections of each image
    objects = embedder.objects_flat(features, found.image[chosen], found.boxes[chosen], batch.shape[-1])
    image_rows = embedder.images(features).half().cpu().numpy()
    per_image = counts.clamp(max=most).cpu().numpy()
    return columns, (image_rows, objects.half().cpu().numpy(), per_image)


_INT_COLUMNS = ("n_det", "committee_n", "top_class")


@torch.no_grad()
def detect_records(
    model: SSDGMM,
    records: Sequence,
    *,
    min_score: float = 0.5,
    batch_size: int = 16,
    on_batch=None,
) -> dict:
    """``image_id -> [Prediction]``: the model's detections with confidence >= ``min_score`` on each
    record's image, in that image's own pixels (unreadable images get none, logged)."""
    config = PostprocessConfig(min_confidence=min_score)
    out = {}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        pixels, errors = decode_images([r.uri for r in batch], model.image_size)
        readable = [i for i, e in enumerate(errors) if e is None]
        if readable:
            images = torch.from_numpy(pixels[readable]).float().div_(255.0)
            found = engine.predict(model, images, config=config, batch_size=len(readable))
            for i, det in zip(readable, found):
                r = batch[i]
                scale = np.array([r.width, r.height, r.width, r.height], np.float64) / model.image_size
                out[r.image_id] = [
                    Prediction(tuple(float(v) for v in box * scale), int(label), float(score))
                    for box, label, score in zip(det.boxes.double().numpy(), det.labels.tolist(), det.scores.tolist())
                ]
        for i, e in enumerate(errors):
            if e is not None:
                out[batch[i].image_id] = []
        if on_batch is not None:
            on_batch(len(batch))
    return out


def score_table(
    model: SSDGMM,
    manifest: pa.Table,
    *,
    batch_size: int = 16,
    config: PostprocessConfig = PostprocessConfig(),
    members: Sequence[SSDGMM] = (),
    mc_passes: int = 0,
    bf16: bool = False,
    embedder: Embedder | None = None,
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
            bf16=bf16,
            embedder=embedder,
        )
        parts.append(pa.Table.from_pydict(rows, schema=SCORE_SCHEMA))
    return pa.concat_tables(parts) if parts else SCORE_SCHEMA.empty_table()
