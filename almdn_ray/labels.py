"""Human labelling: export the selection for a labelling tool, import its COCO file back (checked first)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from almdn_ray import storage
from almdn_ray.cycle import RunLayout
from almdn_ray.data.records import Dataset, ImageRecord
from almdn_ray.state import load_state

__all__ = ["LabelImportError", "awaiting_cycle", "export_labels", "import_labels", "read_imported"]


class LabelImportError(ValueError):
    """A labels file that cannot be imported; nothing was changed."""


def awaiting_cycle(run: str) -> int:
    state = load_state(run)
    if state is None:
        raise FileNotFoundError(f"{run}: no run here (no state.json); start one with `almdn-ray run JOB.yaml`")
    if state.status != "awaiting_labels":
        raise LabelImportError(
            f"{run}: the run is {state.status} (cycle {state.cycle}, stage {state.stage}), not waiting for labels"
        )
    return state.cycle


def _selected(layout: RunLayout, k: int) -> list[str]:
    return storage.read_parquet(layout.cycle(k, "selected.parquet")).column("image_id").to_pylist()


def export_labels(run: str, pool: Dataset) -> tuple[str, str]:
    """Write ``cycles/NNN/export/to_label.json`` (COCO skeleton: images and categories, no annotations) and
    ``to_label.csv`` (image_id, uri) for the images selected in the cycle waiting for labels."""
    layout = RunLayout(run)
    k = awaiting_cycle(run)
    by_id = {r.image_id: r for r in pool.records}
    images = [by_id[i] for i in _selected(layout, k)]
    coco = {
        "info": {"description": f"almdn-ray selection, cycle {k}", "run": run},
        "images": [
            {"id": n, "file_name": r.uri, "width": r.width, "height": r.height, "almdn_image_id": r.image_id}
            for n, r in enumerate(images, start=1)
        ],
        "annotations": [],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(pool.classes)],
    }
    json_uri, csv_uri = layout.cycle(k, "export", "to_label.json"), layout.cycle(k, "export", "to_label.csv")
    storage.write_json(json_uri, coco)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image_id", "uri", "width", "height"])
    writer.writerows([r.image_id, r.uri, r.width, r.height] for r in images)
    storage.write_bytes(csv_uri, text.getvalue().encode())
    return json_uri, csv_uri


def import_labels(run: str, path: str, pool: Dataset) -> int:
    """Check a COCO labels file against the selection and store it as ``cycles/NNN/labels.json``.

    Every selected image must be there (with zero or more boxes), no other image may be, categories must be
    known by name, and boxes must have a positive size inside their image. Any problem raises
    :class:`LabelImportError` listing each one by image, and nothing is written.

    Returns:
        The number of boxes imported.
    """
    layout = RunLayout(run)
    k = awaiting_cycle(run)
    try:
        coco = json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as error:
        raise LabelImportError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}") from error
    selected = set(_selected(layout, k))
    by_id = {r.image_id: r for r in pool.records}
    by_uri = {r.uri: r.image_id for r in pool.records}
    known = {name: i + 1 for i, name in enumerate(pool.classes)}
    problems: list[str] = []
    categories = {}
    for category in coco.get("categories", []):
        if category.get("name") not in known:
            problems.append(
                f"category {category.get('name')!r} (id {category.get('id')}) is unknown; known: {sorted(known)}"
            )
        else:
            categories[category["id"]] = known[category["name"]]
    images = {}
    for image in coco.get("images", []):
        image_id = image.get("almdn_image_id") or by_uri.get(image.get("file_name"))
        if image_id not in selected:
            problems.append(
                f"image {image.get('file_name')!r} was not selected in cycle {k}; import only the exported images"
            )
            continue
        images[image["id"]] = image_id
    missing = sorted(selected - set(images.values()))
    if missing:
        problems.append(f"{len(missing)} selected image(s) are missing from the file, e.g. {missing[:3]}")
    labels: dict[str, list] = {i: [] for i in images.values()}
    for ann in coco.get("annotations", []):
        image_id = images.get(ann.get("image_id"))
        if image_id is None:
            problems.append(f"annotation {ann.get('id')} refers to an image not in the file's selection")
            continue
        record, bbox = by_id[image_id], ann.get("bbox")
        if ann.get("category_id") not in categories:
            problems.append(
                f"image {image_id}: annotation {ann.get('id')} has unknown category {ann.get('category_id')}"
            )
            continue
        if not (isinstance(bbox, list) and len(bbox) == 4):
            problems.append(f"image {image_id}: annotation {ann.get('id')} bbox must be [x, y, width, height]")
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > record.width or y + h > record.height:
            problems.append(
                f"image {image_id}: box {bbox} of annotation {ann.get('id')} is empty or outside the "
                f"{record.width}x{record.height} image"
            )
            continue
        labels[image_id].append({"bbox": [x, y, x + w, y + h], "label": categories[ann["category_id"]]})
    if problems:
        raise LabelImportError(f"{path}: {len(problems)} problem(s), nothing imported:\n  " + "\n  ".join(problems))
    storage.write_json(layout.cycle(k, "labels.json"), labels)
    return sum(len(v) for v in labels.values())


def read_imported(layout: RunLayout, k: int, by_id: dict[str, ImageRecord]) -> dict[str, ImageRecord]:
    """Records of the images labelled by hand in cycle ``k`` (empty if that cycle imported nothing)."""
    uri = layout.cycle(k, "labels.json")
    if not storage.exists(uri):
        return {}
    out = {}
    for image_id, boxes in storage.read_json(uri).items():
        base = by_id[image_id]
        out[image_id] = ImageRecord(
            image_id,
            base.uri,
            base.width,
            base.height,
            np.asarray([b["bbox"] for b in boxes], np.float32).reshape(-1, 4),
            np.asarray([b["label"] for b in boxes], np.int64),
            np.zeros(len(boxes), bool),
        )
    return out
