"""``report/report.html``: one self-contained page (no server, no network) with the learning curve, the per-cycle
table and, for every selection, a grid of the picked images with their detections and AL-MDN terms.

The data (thumbnails as JPEG data URIs, boxes, terms) is one JSON block in the page; the page's own script
draws the grids and sorts and filters them (standard library only, no front-end build). Per selection, what
the page shows comes from three places of the run folder:

* ``selected.parquet``: the picks, their score and rank (a score of -inf/NaN: a random-fill pick);
* the cycle's score files: each pick's four per-image term maxima, z-scored with the pool statistics the
  selection used, and the picks' embeddings (near-duplicates among the picks, or of labelled images when the
  strategy scored those);
* the cycle's model, run once over the picks in batches (:func:`look_at_picks`) for the per-box detections;
  the result is kept in ``report/selections/NNN.json`` so that a later report does not predict again.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from almdn_ray import acquisition, diversity, reduce, storage
from almdn_ray.acquisition import TERMS, is_scored
from almdn_ray.layout import RunLayout, labeled_ids

logger = logging.getLogger(__name__)

__all__ = ["THUMBNAIL_SIDE", "THUMBNAIL_BYTES", "MAX_BOXES", "thumbnail", "selection_views", "render_page"]

THUMBNAIL_SIDE = 160  # pixels, longer side; smaller images are kept as they are
THUMBNAIL_BYTES = 12_000  # JPEG quality drops (then the side) until a thumbnail fits: 1,000 picks < ~17 MB
MAX_BOXES = 20  # per image in the page: the most confident, plus each term's most uncertain box
CACHE_VERSION = 1
_QUALITIES = (80, 65, 50, 35, 20)


def thumbnail(pixels: np.ndarray, *, side: int = THUMBNAIL_SIDE, max_bytes: int = THUMBNAIL_BYTES) -> str:
    """A ``data:image/jpeg;base64`` URI of ``pixels`` (``[H, W, 3]`` uint8 RGB), at most ``side`` pixels on its
    longer side and ``max_bytes`` long before base64 (quality, then size, go down until it fits)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    image.thumbnail((side, side), Image.BILINEAR)
    while True:
        for quality in _QUALITIES:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality, optimize=True)
            if buffer.tell() <= max_bytes:
                return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        image = image.resize((max(1, image.width * 3 // 4), max(1, image.height * 3 // 4)), Image.BILINEAR)


def _number(value: float | None, digits: int = 4) -> float | None:
    """A float for the page's JSON: ``digits`` significant digits; None for None, -inf and NaN (no value)."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(f"{float(value):.{digits}g}")


def _term_values(folder: str, picked: list[str], labelled: list[str]) -> dict[str, dict[str, float | None]]:
    """Each pick's four term maxima z-scored by the pool statistics of the selection (readable, unlabelled
    rows of the score files, as in :func:`reduce.select_from_scores`), file by file."""
    columns = ["image_id", "n_det", "error"] + [f"{t}_{s}" for t in TERMS for s in ("max", "sum", "sumsq")]
    summed = ["n_det"] + [f"{t}_{s}" for t in TERMS for s in ("sum", "sumsq")]
    totals: dict[str, list[float]] = {name: [] for name in summed}  # per score file: what pool_statistics sums
    maxima: dict[str, list[float]] = {}
    wanted, known = pa.array(picked, pa.string()), pa.array(labelled, pa.string())
    for uri in storage.list_files(folder, pattern="*.parquet"):
        table = storage.read_parquet(uri, columns=columns)
        table = table.filter(pc.and_(pc.is_null(table.column("error")), pc.invert(pc.is_in(table["image_id"], known))))
        for name in summed:
            totals[name].append(pc.sum(table.column(name)).as_py() or 0)
        for row in table.filter(pc.is_in(table["image_id"], wanted)).to_pylist():
            # null: a row that was not scored (random selects without a model)
            maxima[row["image_id"]] = [math.nan if row[f"{t}_max"] is None else row[f"{t}_max"] for t in TERMS]
    stats = acquisition.pool_statistics({name: np.asarray(v, np.float64) for name, v in totals.items()})
    out = {}
    for image_id, values in maxima.items():
        z = acquisition._zscore(np.asarray(values, np.float64), stats.mean, stats.std)
        out[image_id] = {t: _number(v) if math.isfinite(raw) else None for t, v, raw in zip(TERMS, z, values)}
    return out


def _near_duplicates(folder: str, picked: list[str], labelled: list[str], max_distance: float) -> dict[str, dict]:
    """Per pick with a near-duplicate (embedding distance <= ``max_distance``): the other picks in its group
    (``of``) and whether a labelled image is that near (``labelled``; known when the cycle scored them)."""
    table = reduce.read_embeddings(folder, picked)
    table = table.filter(pc.is_valid(table.column("embedding")))
    features = reduce.embedding_matrix(table.column("embedding"))
    if table.num_rows == 0 or features.shape[1] == 0:
        return {}
    ids = table.column("image_id").to_pylist()
    marks: dict[str, dict] = {}
    for group in diversity.duplicate_groups(features, max_distance):
        for i in group:
            marks[ids[i]] = {"of": [ids[j] for j in group if j != i], "labelled": False}
    known = reduce.read_embeddings(folder, labelled) if labelled else None
    if known is not None and known.num_rows:
        others = diversity.normalise(reduce.embedding_matrix(known.column("embedding")))
        nearest = diversity._min_distance_to(diversity.normalise(features), others, 2048)
        for i in np.flatnonzero(nearest <= max_distance + diversity.COSINE_TOLERANCE):
            marks.setdefault(ids[i], {"of": [], "labelled": False})["labelled"] = True
    return marks


def _boxes(det, scale_x: float, scale_y: float) -> dict:
    """The page's boxes of one image's :class:`Detections` (in image pixels): the ``MAX_BOXES`` most confident and
    the most uncertain box of each term, as ``[x1, y1, x2, y2, label, confidence, loc_al, loc_ep, cls_al, cls_ep]``."""
    count = len(det.scores)
    keep = set(range(min(count, MAX_BOXES)))
    if count:
        keep |= {int(getattr(det, t).argmax()) for t in TERMS}
    boxes = []
    for i in sorted(keep):
        x1, y1, x2, y2 = det.boxes[i].tolist()
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2, float(det.scores[i]))):
            continue  # a diverged model's box: nothing to draw (and JSON has no NaN)
        boxes.append(
            [round(x1 * scale_x, 1), round(y1 * scale_y, 1), round(x2 * scale_x, 1), round(y2 * scale_y, 1)]
            + [int(det.labels[i]), round(float(det.scores[i]), 3)]
            + [_number(getattr(det, t)[i]) for t in TERMS]
        )
    return {"boxes": boxes, "detections": count, "labels": sorted(set(det.labels.tolist()))}


def look_at_picks(rows: list[dict], model=None, *, config=None, batch_size: int = 16) -> dict[str, dict]:
    """Read each pick once: its thumbnail and size, and with ``model`` its detections (batched forward passes at
    the model's input size, as SCORE runs them), in the image's own pixels.

    Args:
        rows: manifest rows (``image_id``, ``uri``) of the picks.
        model: the cycle's model (eval mode) or None (thumbnails only).
        config: the job's ``PostprocessConfig`` (the detections SCORE summarised).

    Returns:
        ``image_id -> {"thumb", "width", "height"}`` plus ``boxes``, ``detections``, ``labels`` with a model,
        or ``{"error"}`` for an image that cannot be read.
    """
    import torch
    from torchvision.transforms import v2

    from almdn_ray import engine
    from almdn_ray.data.images import read_image

    out: dict[str, dict] = {}
    resize = v2.Resize((model.image_size, model.image_size), antialias=True) if model is not None else None
    for start in range(0, len(rows), batch_size):
        inputs, sizes = [], []
        for row in rows[start : start + batch_size]:
            try:
                image = read_image(row["uri"])
            except OSError as error:  # ImageReadError included
                out[row["image_id"]] = {"error": str(error)}
                continue
            height, width = image.shape[-2:]
            out[row["image_id"]] = {
                "thumb": thumbnail(image.permute(1, 2, 0).numpy()),
                "width": width,
                "height": height,
            }
            if model is not None:
                inputs.append(resize(image))
                sizes.append((row["image_id"], width / model.image_size, height / model.image_size))
        if inputs:
            found = engine.predict(
                model, torch.stack(inputs).float().div_(255.0), config=config, batch_size=len(inputs)
            )
            for (image_id, sx, sy), det in zip(sizes, found):
                out[image_id].update(_boxes(det, sx, sy))
    return out


def _cached_look(run: str, k: int, rows: list[dict], job, classes) -> tuple[dict[str, dict], bool]:
    """:func:`look_at_picks` for cycle ``k``'s picks with its model, kept in ``report/selections/NNN.json``.
    Returns ``(per image, whether the detections are there)``; without a loadable model, thumbnails only."""
    from almdn_ray import scoring
    from almdn_ray.layout import model_spec

    layout = RunLayout(run)
    ids = [row["image_id"] for row in rows]
    cache = storage.join(layout.report, "selections", f"{k:03d}.json")
    if storage.exists(cache):
        kept = storage.read_json(cache)
        if kept.get("version") == CACHE_VERSION and kept.get("image_ids") == ids and kept.get("detections"):
            return kept["images"], True
    model = None
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        spec = model_spec(job, len(classes) + 1)
        model = scoring.load_model(spec, layout.cycle(k, "train", "model.pt"), device)
    except Exception as error:  # a page without boxes is still a page
        logger.warning("cycle %d: no detections drawn on the picks (its model: %s)", k, error)
    images = look_at_picks(rows, model, config=job.acquisition.postprocess(), batch_size=job.resources.eval_batch_size)
    if model is not None:
        storage.write_json(cache, {"version": CACHE_VERSION, "image_ids": ids, "detections": True, "images": images})
    return images, model is not None


def selection_views(run: str) -> list[dict]:
    """Every selection of the run as the page shows it: ``{"cycle", "strategy", "min_distance", "detections",
    "picks": [...]}``, one pick per selected image in rank order (see the module docstring for the sources)."""
    from almdn_ray.config import spec_from_dict
    from almdn_ray.data.manifest import read_manifest
    from almdn_ray.state import load_state

    layout = RunLayout(run)
    state = load_state(run)
    if state is None:
        return []
    job = spec_from_dict(yaml.safe_load(storage.read_bytes(layout.job)), layout.job)
    views = []
    for k in range(state.cycle + 1):
        if not storage.exists(layout.cycle(k, "selected.parquet")):
            continue
        selected = storage.read_parquet(layout.cycle(k, "selected.parquet")).to_pylist()
        ids = [row["image_id"] for row in selected]
        metrics = layout.cycle(k, "metrics.json")
        classes = storage.read_json(metrics).get("classes") if storage.exists(metrics) else None
        labelled = labeled_ids(layout, k)
        folder = layout.cycle(k, "scores")
        terms = _term_values(folder, ids, labelled) if storage.exists(storage.join(folder, "_SUCCESS")) else {}
        duplicates = {}
        if terms:
            try:
                duplicates = _near_duplicates(folder, ids, labelled, job.acquisition.min_distance)
            except (pa.ArrowInvalid, KeyError) as error:  # score files of an older almdn-ray: no embeddings
                logger.warning("cycle %d: near-duplicates not marked (%s)", k, error)
        manifest = read_manifest(layout.pool, ids=ids, columns=["image_id", "uri"]).to_pylist()
        uris = {row["image_id"]: row["uri"] for row in manifest}
        rows = [{"image_id": i, "uri": uris[i]} for i in ids if i in uris]
        looked, detected = _cached_look(run, k, rows, job, classes or [])
        views.append(
            {
                "cycle": k,
                "strategy": job.acquisition.strategy,
                "min_distance": job.acquisition.min_distance,
                "detections": detected,
                "classes": classes or [],
                "picks": [_pick(row, terms, duplicates, looked) for row in selected],
            }
        )
    return views


def _pick(row: dict, terms: dict, duplicates: dict, looked: dict) -> dict:
    """One pick of the page from its ``selected.parquet`` row and what :func:`selection_views` gathered."""
    image_id = row["image_id"]
    pick = {"id": image_id, "rank": int(row["rank"]), "score": _number(row["score"])}
    pick["unscored"] = not bool(is_scored(np.array([row["score"]], np.float64))[0])
    pick["terms"] = terms.get(image_id, dict.fromkeys(TERMS))
    pick["duplicate"] = duplicates.get(image_id)
    pick.update(looked.get(image_id, {"error": "not in the pool manifest"}))
    if "labels" not in pick:  # no detections drawn: the class SCORE found most confident
        top = row.get("top_class", -1)
        pick["labels"] = [] if top is None or top < 0 else [int(top)]
    return pick


def render_page(data: dict) -> str:
    """The page: the template with ``data`` (run, table, curve, selections) as its JSON block."""
    template = resources.files("almdn_ray").joinpath("report_page.html").read_text(encoding="utf-8")
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    title = f"almdn-ray report: run {data.get('run_id', '?')}"
    title = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return template.replace("__TITLE__", title).replace("__REPORT_DATA__", blob)
