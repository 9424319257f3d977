"""COCO instances JSON: reader into :class:`Dataset` and writer back to COCO form."""

from __future__ import annotations

import json
import os
import posixpath
from collections import defaultdict

import numpy as np

from almdn_ray import storage
from almdn_ray.data.records import DataProblems, Dataset, ImageRecord, clip_boxes

__all__ = ["read_coco", "to_coco_dict", "write_coco"]


def _parent(uri: str) -> str:
    return posixpath.dirname(uri) if "://" in uri else os.path.dirname(os.path.abspath(uri))


def _finite_size(value) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if np.isfinite(number) and number >= 1 else None


def _name_parts(file_name: str) -> list[str]:
    """A ``file_name``'s path parts; Windows tools write ``\\`` separators."""
    return [part for part in file_name.replace("\\", "/").split("/") if part not in ("", ".")]


def _classes(content: dict, source: str, problems: DataProblems) -> list[dict]:
    """The categories that are classes, in id order.

    A category with no boxes that is the ``supercategory`` of the others (Roboflow's dataset-level class 0)
    is not a class and is dropped with a warning; other categories without boxes stay classes (a labelling
    tool lists every class of the project) and are counted in a warning.
    """
    categories = []
    for position, category in enumerate(content["categories"]):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or "name" not in category:
            problems.error(f"{source}: categories[{position}] must have an integer 'id' and a 'name'")
        else:
            categories.append(category)
    seen: dict[int, str] = {}
    for category in categories:
        if category["id"] in seen:
            problems.error(
                f"{source}: categories {seen[category['id']]!r} and {category['name']!r} share id {category['id']}; "
                "give every category its own id"
            )
        seen[category["id"]] = category["name"]
    used = {ann.get("category_id") for ann in content["annotations"] if isinstance(ann, dict)}
    parents = {c.get("supercategory") for c in categories if c.get("supercategory") not in (None, "", "none")}
    kept = []
    for category in sorted(categories, key=lambda c: c["id"]):
        if category["id"] not in used and category["name"] in parents:
            problems.warn(
                "super-categories dropped",
                f"{source}: category {category['id']} {category['name']!r} has no boxes and is the supercategory "
                "of the others: not a class",
            )
            continue
        if category["id"] not in used:
            problems.warn(
                "classes without boxes",
                f"{source}: category {category['id']} {category['name']!r} has no boxes (kept as a class)",
            )
        kept.append(category)
    return kept


def read_coco(annotation_file: str, *, image_root: str | None = None) -> Dataset:
    """Read a COCO instances JSON.

    Category ids become contiguous labels 1..N in id order (``Dataset.category_ids`` maps them back);
    ``iscrowd`` boxes are kept as ``difficult`` (excluded from training, ignored in evaluation as COCO
    does); images without annotations are kept.

    Args:
        annotation_file: local path or ``s3://`` URI of the JSON.
        image_root: folder the images' ``file_name`` are relative to (default: the JSON's folder).

    Raises:
        DatasetError: listing malformed JSON (with line and column), missing keys, unknown categories or
            images, and duplicate image ids.
    """
    problems = DataProblems()
    try:
        content = json.loads(storage.read_bytes(annotation_file))
    except json.JSONDecodeError as error:
        problems.error(f"{annotation_file}: malformed JSON at line {error.lineno}, column {error.colno} ({error.msg})")
        problems.raise_if_errors(annotation_file)
    if not isinstance(content, dict):
        problems.error(f"{annotation_file}: expected a COCO object with images, annotations and categories")
        problems.raise_if_errors(annotation_file)
    for key in ("images", "annotations", "categories"):
        if not isinstance(content.get(key), list):
            problems.error(
                f"{annotation_file}: missing list {key!r}; a COCO instances file has images, annotations and categories"
            )
    problems.raise_if_errors(annotation_file)
    root = image_root if image_root is not None else _parent(annotation_file)

    categories = _classes(content, annotation_file, problems)
    category_ids = tuple(int(c["id"]) for c in categories)
    label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}
    images = {}
    for position, image in enumerate(content["images"]):
        missing = [k for k in ("id", "file_name", "width", "height") if k not in image]
        if missing:
            problems.error(f"{annotation_file}: images[{position}] lacks {missing}")
            continue
        if ".." in _name_parts(str(image["file_name"])) or str(image["file_name"]).startswith(("/", "\\")):
            problems.error(
                f"{annotation_file}: images[{position}] file_name {image['file_name']!r} leaves the image root; "
                "give names relative to it (and --image-root / dataset.*_image_root for the folder)"
            )
            continue
        sizes = [_finite_size(image.get(k)) for k in ("width", "height")]
        if None in sizes:
            problems.error(
                f"{annotation_file}: images[{position}] ({image['file_name']}) width/height "
                f"{image.get('width')!r}x{image.get('height')!r} must be positive numbers"
            )
            continue
        if image["id"] in images:
            problems.error(f"{annotation_file}: images[{position}] repeats image id {image['id']}; ids must be unique")
            continue
        images[image["id"]] = image
    if not images and not problems.errors:
        problems.error(f"{annotation_file}: no images; the split is empty")

    per_image = defaultdict(list)
    for position, ann in enumerate(content["annotations"]):
        where = f"{annotation_file}: annotations[{position}] (id {ann.get('id')})"
        if ann.get("image_id") not in images:
            problems.error(f"{where} refers to unknown image id {ann.get('image_id')}")
        elif ann.get("category_id") not in label_of:
            problems.error(f"{where}: unknown category id {ann.get('category_id')}; known: {list(category_ids)}")
        elif not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4):
            problems.error(f"{where}: bbox must be [x, y, width, height]")
        else:
            per_image[ann["image_id"]].append(ann)
    problems.raise_if_errors(annotation_file)

    records = []
    for image_id, image in images.items():
        anns = per_image.get(image_id, [])
        boxes = np.asarray([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        where = f"{annotation_file}: image {image_id} ({image['file_name']})"
        keep = clip_boxes(boxes, int(image["width"]), int(image["height"]), where, problems)
        labels = np.asarray([label_of[a["category_id"]] for a in anns], np.int64)
        crowd = np.asarray([str(a.get("iscrowd", 0)).strip().lower() in ("1", "true") for a in anns], bool)
        records.append(
            ImageRecord(
                str(image_id),
                storage.join(root, *_name_parts(str(image["file_name"]))),
                int(image["width"]),
                int(image["height"]),
                boxes[keep],
                labels[keep],
                crowd[keep],
            )
        )
    problems.log_summary(annotation_file)
    return Dataset(records, tuple(str(c["name"]) for c in categories), problems, category_ids)


def to_coco_dict(
    dataset: Dataset, *, file_names: dict[str, str] | None = None, extra: dict[str, list[dict]] | None = None
) -> dict:
    """A COCO instances dict of a dataset (numeric image ids in record order; boxes as xywh).

    Args:
        file_names: ``image_id -> file_name`` (default: the record's URI).
        extra: per image id, extra fields merged into each of its annotations (same order as its boxes).
    """
    category_ids = dataset.category_ids or tuple(range(1, len(dataset.classes) + 1))
    out = {
        "images": [],
        "annotations": [],
        "categories": [{"id": cid, "name": name} for cid, name in zip(category_ids, dataset.classes)],
    }
    for number, record in enumerate(dataset.records, start=1):
        name = (file_names or {}).get(record.image_id, record.uri)
        out["images"].append(
            {
                "id": number,
                "file_name": name,
                "width": record.width,
                "height": record.height,
                "almdn_image_id": record.image_id,
            }
        )
        fields = (extra or {}).get(record.image_id) or [{}] * len(record.labels)
        for box, label, crowd, more in zip(
            record.boxes.tolist(), record.labels.tolist(), record.difficult.tolist(), fields
        ):
            x1, y1, x2, y2 = box
            out["annotations"].append(
                {
                    "id": len(out["annotations"]) + 1,
                    "image_id": number,
                    "category_id": category_ids[label - 1],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(crowd),
                    **more,
                }
            )
    return out


def write_coco(uri: str, coco: dict) -> None:
    storage.write_bytes(uri, json.dumps(coco).encode())
