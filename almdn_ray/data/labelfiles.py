"""Labelling-tool exports read into one form, whatever tool wrote them. No run and no matching here.

Read: COCO instances JSON (as Label Studio, CVAT, Roboflow and FiftyOne write it), Label Studio's JSON task
export, and Pascal VOC folders or zips (CVAT's "Pascal VOC 1.1", Datumaro). :func:`read_label_file` detects
which from the file. Each image keeps every name the tool wrote for it (``file_name``, Roboflow's
``extra.name``, Label Studio's ``data.image``, VOC's ``<filename>``) and the id almdn-ray exported, so
:mod:`almdn_ray.labels` can match it to the pool; :func:`name_candidates` undoes the tools' renaming.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from urllib.parse import unquote

import numpy as np

from almdn_ray import storage
from almdn_ray.data.records import DataProblems, Dataset, ImageRecord, clip_boxes

__all__ = [
    "FileBox", "FileImage", "LabelFile", "LabelFileError", "read_label_file", "name_candidates",
    "MULTIPLE_ANNOTATIONS_POLICY", "label_file_dataset", "read_labelstudio_tasks",
]  # fmt: skip

MULTIPLE_ANNOTATIONS_POLICY = (
    "Label Studio tasks with several annotations: cancelled ones are skipped; a ground-truth annotation wins; "
    "otherwise the latest updated (then created) one"
)


class LabelFileError(ValueError):
    """A file that is no labelling-tool export this reader knows."""


@dataclass
class FileBox:
    """One box as the file gives it: ``xyxy`` in the image's frame (``FileImage.size``), or ``problem``."""

    where: str
    category: str | None
    xyxy: tuple[float, float, float, float] | None
    difficult: bool = False
    problem: str | None = None


@dataclass
class FileImage:
    """One image of the file. ``size`` is the ``(width, height)`` its boxes are measured in: the tool's image
    (Roboflow may have resized it), ``(1, 1)`` for fractions of the image (Label Studio), None when unknown."""

    where: str
    names: list[str]
    exported_id: str | None
    size: tuple[float, float] | None
    boxes: list[FileBox] = field(default_factory=list)
    pixels: tuple[int, int] | None = None  # the image's own (width, height) where the file says it


@dataclass
class LabelFile:
    source: str
    format: str  # "coco" | "labelstudio" | "voc"
    images: list[FileImage]
    categories: list[str]  # every class name the file declares, used or not
    problems: DataProblems


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _box(where: str, category: str | None, values, difficult: bool = False) -> FileBox:
    """A box from four numbers ``x1, y1, x2, y2``; non-numbers are a problem, NaN/inf are checked later."""
    numbers = [_number(v) for v in values]
    if len(numbers) != 4 or None in numbers:
        return FileBox(where, category, None, difficult, f"coordinates {list(values)!r} are not four numbers")
    return FileBox(where, category, tuple(numbers), difficult)


# ---- file names -----------------------------------------------------------------------------------------------
_UPLOAD_HASH = re.compile(r"^[0-9a-f]{8}-(?=.)")  # Label Studio's upload prefix
_ROBOFLOW = re.compile(r"^(?P<stem>.+)_(?P<ext>[A-Za-z0-9]+)\.rf\.[0-9a-f]{32}\.[A-Za-z0-9]+$")


def name_candidates(name: str) -> list[str]:
    """Relative paths an image name may stand for, as written first, then with the tool's renaming undone.

    Undone: ``\\`` separators; URL quoting; a URL's scheme and host (or bucket); Label Studio's
    ``/data/upload/<project>/`` and ``/data/local-files/?d=`` prefixes and its ``<8 hex>-`` upload hash;
    Roboflow's ``<stem>_<ext>.rf.<hash>.<ext>``.
    """
    text = unquote(str(name)).replace("\\", "/")
    if "?d=" in text:
        text = text.split("?d=", 1)[1]
    text = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*", "", text)
    text = re.sub(r"^/?data/upload/\d+/", "", text)
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if not parts:
        return []
    base = parts[-1]
    match = _ROBOFLOW.match(base)
    cleaned = f"{match['stem']}.{match['ext']}" if match else _UPLOAD_HASH.sub("", base)
    out = ["/".join(parts)]
    if cleaned != base:
        out.append("/".join([*parts[:-1], cleaned]))
    return out


# ---- COCO -----------------------------------------------------------------------------------------------------
def _read_coco(source: str, content: dict, problems: DataProblems) -> LabelFile:
    for key in ("images", "annotations", "categories"):
        if not isinstance(content.get(key), list):
            problems.error(f"{source}: missing list {key!r}; a COCO file has images, annotations and categories")
    if problems.errors:
        return LabelFile(source, "coco", [], [], problems)
    names: dict[object, str] = {}
    for position, category in enumerate(content["categories"]):
        if not isinstance(category, dict) or "id" not in category or not isinstance(category.get("name"), str):
            problems.error(f"{source}: categories[{position}] must have an 'id' and a 'name'")
        elif category["id"] in names:
            problems.error(
                f"{source}: categories {names[category['id']]!r} and {category['name']!r} share id {category['id']}"
            )
        else:
            names[category["id"]] = category["name"]
    images: dict[object, FileImage] = {}
    for position, image in enumerate(content["images"]):
        if not isinstance(image, dict) or "id" not in image:
            problems.error(f"{source}: images[{position}] must be an object with an 'id'")
            continue
        where = f"image {image['id']} ({image.get('file_name')!r})"
        if image["id"] in images:
            problems.error(f"{source}: images[{position}] repeats image id {image['id']}")
            continue
        written = [image.get("file_name")] + [(image.get("extra") or {}).get("name")]
        width, height = _number(image.get("width")), _number(image.get("height"))
        exported = image.get("almdn_image_id")
        size = (width, height) if width and height else None
        images[image["id"]] = FileImage(
            where,
            [str(n) for n in written if isinstance(n, str) and n],
            str(exported) if exported is not None else None,
            size,
            pixels=(int(width), int(height)) if size and math.isfinite(width * height) else None,
        )
    for position, ann in enumerate(content["annotations"]):
        if not isinstance(ann, dict):
            problems.error(f"{source}: annotations[{position}] is not an object")
            continue
        where = f"annotation {ann.get('id', position)}"
        image = images.get(ann.get("image_id"))
        if image is None:
            problems.error(f"{source}: {where} refers to image id {ann.get('image_id')!r}, which the file lacks")
            continue
        bbox = ann.get("bbox")
        if ann.get("category_id") not in names:
            image.boxes.append(
                FileBox(where, None, None, problem=f"category id {ann.get('category_id')!r} is not in categories")
            )
        elif not (isinstance(bbox, list) and len(bbox) == 4):
            image.boxes.append(FileBox(where, None, None, problem=f"bbox {bbox!r} must be [x, y, width, height]"))
        else:
            box = _box(where, names[ann["category_id"]], bbox, str(ann.get("iscrowd", 0)) in ("1", "True", "true"))
            if box.xyxy is not None:
                x, y, w, h = box.xyxy
                box.xyxy = (x, y, x + w, y + h)
            image.boxes.append(box)
    return LabelFile(source, "coco", list(images.values()), list(names.values()), problems)


# ---- Label Studio JSON tasks ------------------------------------------------------------------------------------
def _chosen_annotation(task: dict, where: str, problems: DataProblems) -> dict | None:
    annotations = task.get("annotations", task.get("completions"))
    if not isinstance(annotations, list):
        problems.error(f"{where}: 'annotations' must be a list")
        return None
    live = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not live:
        return None
    ranked = sorted(
        live,
        key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or ""), str(a.get("created_at") or "")),
    )
    chosen = ranked[-1]
    if len(annotations) > 1:
        why = "ground truth" if chosen.get("ground_truth") else "latest"
        problems.warn(
            "tasks with several annotations (one taken)",
            f"{where}: {len(annotations)} annotations (by {[a.get('completed_by') for a in annotations]}); took "
            f"annotation {chosen.get('id')} ({why}); "
            f"{len(annotations) - len(live)} cancelled",
        )
    return chosen


def _rectangle(result: dict, where: str, problems: DataProblems) -> FileBox:
    """A ``rectanglelabels`` region as fractions of the image; a rotated one as its enclosing box."""
    value = result.get("value")
    if not isinstance(value, dict):
        return FileBox(where, None, None, problem="region has no 'value'")
    labels = value.get("rectanglelabels")
    if not (isinstance(labels, list) and len(labels) == 1 and isinstance(labels[0], str)):
        return FileBox(where, None, None, problem=f"rectanglelabels {labels!r} must name exactly one class")
    numbers = [_number(value.get(k)) for k in ("x", "y", "width", "height")]
    if None in numbers:
        return FileBox(where, labels[0], None, problem="x, y, width and height must be numbers (percent)")
    x, y, w, h = numbers
    width, height = _number(result.get("original_width")) or 100.0, _number(result.get("original_height")) or 100.0
    angle = _number(value.get("rotation")) or 0.0
    # Percent -> the tool's pixels, rotate about the top-left corner (clockwise, y down), back to fractions.
    px, py, pw, ph = x * width / 100, y * height / 100, w * width / 100, h * height / 100
    if angle % 360:
        problems.warn("rotated rectangles taken as their enclosing box", f"{where}: rotation {angle}")
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        xs = [px + dx * c - dy * s for dx, dy in ((0, 0), (pw, 0), (pw, ph), (0, ph))]
        ys = [py + dx * s + dy * c for dx, dy in ((0, 0), (pw, 0), (pw, ph), (0, ph))]
        corners = (min(xs), min(ys), max(xs), max(ys))
    else:
        corners = (px, py, px + pw, py + ph)
    x1, y1, x2, y2 = corners
    return FileBox(where, labels[0], (x1 / width, y1 / height, x2 / width, y2 / height))


def _read_labelstudio(source: str, tasks: list, problems: DataProblems) -> LabelFile:
    images, categories = [], []
    for position, task in enumerate(tasks):
        where = f"task {task.get('id', position) if isinstance(task, dict) else position}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            problems.error(f"{source}: {where} must be an object with 'data' (a Label Studio task)")
            continue
        data = task["data"]
        written = data.get("image")
        if not isinstance(written, str):
            written = next((v for v in data.values() if isinstance(v, str)), None)
        exported = data.get("almdn_image_id")
        image = FileImage(
            f"{where} ({written!r})",
            [written] if written else [],
            str(exported) if exported is not None else None,
            (1.0, 1.0),
        )
        sizes = _number(data.get("width")), _number(data.get("height"))
        if all(sizes) and math.isfinite(sizes[0] * sizes[1]):
            image.pixels = (int(sizes[0]), int(sizes[1]))
        annotation = _chosen_annotation(task, f"{source}: {where}", problems)
        if annotation is None:
            problems.error(
                f"{source}: {where} ({written!r}) has no annotation that was not cancelled; label it (an image "
                "without objects is an annotation with no regions) or leave the task out of the export"
            )
            continue
        for number, result in enumerate(annotation.get("result") or []):
            region = f"annotation {annotation.get('id')} region {result.get('id', number)!r}"
            if not isinstance(result, dict):
                image.boxes.append(FileBox(region, None, None, problem="region is not an object"))
            elif result.get("type") != "rectanglelabels":
                problems.warn(
                    "regions that are not rectangles ignored", f"{source}: {where} {region}: type {result.get('type')}"
                )
            else:
                box = _rectangle(result, f"{region}", problems)
                sizes = _number(result.get("original_width")), _number(result.get("original_height"))
                if image.pixels is None and all(sizes) and math.isfinite(sizes[0] * sizes[1]):
                    image.pixels = (int(sizes[0]), int(sizes[1]))
                if box.category is not None and box.category not in categories:
                    categories.append(box.category)
                image.boxes.append(box)
        images.append(image)
    return LabelFile(source, "labelstudio", images, categories, problems)


def read_labelstudio_tasks(source: str, tasks: list) -> LabelFile:
    """Label Studio tasks (as its JSON export or its API gives them) read as :func:`read_label_file` reads
    such a file; ``source`` names where they came from in every message."""
    return _read_labelstudio(source, tasks, DataProblems())


# ---- Pascal VOC (folder or zip) ---------------------------------------------------------------------------------
def _voc_files(path: str) -> dict[str, bytes]:
    """``relative path -> bytes`` of the XML and text files of a VOC folder or zip (images are not read)."""
    if path.lower().endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(storage.read_bytes(path))) as archive:
            return {
                name: archive.read(name)
                for name in archive.namelist()
                if name.lower().endswith((".xml", ".txt")) and not name.startswith("__MACOSX")
            }
    base = str(path).rstrip("/")
    return {
        uri[len(base) :].lstrip("/"): storage.read_bytes(uri)
        for uri in storage.list_files(path)
        if uri.lower().endswith((".xml", ".txt"))
    }


def _read_voc(source: str, problems: DataProblems) -> LabelFile:
    files = _voc_files(source)
    xmls = sorted(name for name in files if "Annotations/" in f"/{name}" and name.lower().endswith(".xml"))
    if not xmls:
        raise LabelFileError(f"{source}: no Annotations/*.xml inside; a Pascal VOC export has them")
    prefix = xmls[0][: xmls[0].index("Annotations/")] if not xmls[0].startswith("Annotations/") else ""
    categories = []
    labelmap = files.get(f"{prefix}labelmap.txt")
    if labelmap is not None:
        for line in labelmap.decode("utf-8").splitlines():
            name = line.split(":", 1)[0].strip()
            if name and not line.lstrip().startswith("#") and name.lower() != "background":
                categories.append(name)
    one_based = labelmap is None  # CVAT / Datumaro write continuous coordinates and a labelmap.txt
    images = []
    for name in xmls:
        where = f"{name}"
        try:
            root = ET.fromstring(files[name])
        except ET.ParseError as error:
            problems.error(f"{source}: {name}: malformed XML at line {error.position[0]} ({error.msg})")
            continue
        stem = posixpath.splitext(posixpath.basename(name))[0]
        filename = (root.findtext("filename") or "").strip()
        width, height = _number(root.findtext("size/width")), _number(root.findtext("size/height"))
        size = (width, height) if width and height else None
        image = FileImage(
            where,
            [n for n in (filename, stem) if n],
            None,
            size,
            pixels=(int(width), int(height)) if size and math.isfinite(width * height) else None,
        )
        for index, obj in enumerate(root.iter("object")):
            label = (obj.findtext("name") or "").strip() or None
            corners = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
            box = _box(f"object {index}", label, corners, (obj.findtext("difficult") or "0").strip() == "1")
            if label is None:
                box.problem = "object has no <name>"
            elif box.xyxy is not None and one_based:
                x1, y1, x2, y2 = box.xyxy
                box.xyxy = (x1 - 1, y1 - 1, x2, y2)
            if label is not None and label not in categories and labelmap is None:
                categories.append(label)
            image.boxes.append(box)
        images.append(image)
    return LabelFile(source, "voc", images, categories, problems)


def label_file_dataset(labels: LabelFile, image_root: str | None = None) -> Dataset:
    """A labelling-tool file as a :class:`Dataset` (for ``data validate`` and as a dataset of its own).

    Classes are the file's categories in order; image URIs are the names the tool wrote (its renaming
    undone) under ``image_root`` (default: the file's folder). Images without a known size, and the box
    problems, are errors; boxes over the edge are clipped with a warning.
    """
    problems = labels.problems
    root = image_root if image_root is not None else posixpath.dirname(str(labels.source).rstrip("/"))
    if not labels.source.lower().endswith(".json"):
        root = image_root if image_root is not None else storage.join(labels.source, "JPEGImages")
    label_of = {name: i + 1 for i, name in enumerate(labels.categories)}
    records = []
    for image in labels.images:
        where = f"{labels.source}: {image.where}"
        if image.pixels is None:
            problems.error(f"{where}: the image's size is not in the file; the file cannot be read without it")
            continue
        width, height = image.pixels
        frame = image.size or (width, height)
        boxes, classes, difficult = [], [], []
        for box in image.boxes:
            if box.problem or box.xyxy is None or not all(math.isfinite(v) for v in box.xyxy):
                problems.error(f"{where} {box.where}: {box.problem or f'coordinates {box.xyxy} are not finite'}")
                continue
            if box.category not in label_of:
                problems.error(f"{where} {box.where}: category {box.category!r} is not one of {labels.categories}")
                continue
            x1, y1, x2, y2 = box.xyxy
            sx, sy = width / frame[0], height / frame[1]
            boxes.append([x1 * sx, y1 * sy, x2 * sx, y2 * sy])
            classes.append(label_of[box.category])
            difficult.append(box.difficult)
        array = np.asarray(boxes, np.float32).reshape(-1, 4)
        keep = clip_boxes(array, width, height, where, problems)
        name = next(iter(name_candidates(image.names[0])[-1:]), "") if image.names else ""
        records.append(
            ImageRecord(
                image.exported_id or posixpath.splitext(name)[0] or image.where,
                storage.join(root, *name.split("/")) if name else root,
                width,
                height,
                array[keep],
                np.asarray(classes, np.int64)[keep],
                np.asarray(difficult, bool)[keep],
            )
        )
    if not records and not problems.errors:
        problems.error(f"{labels.source}: no images")
    problems.raise_if_errors(labels.source)
    problems.log_summary(labels.source)
    return Dataset(records, tuple(labels.categories), problems)


def read_label_file(path: str) -> LabelFile:
    """Read a labelling tool's export, detecting the format from the file.

    Raises:
        LabelFileError: malformed JSON (with line and column) or a file of no known format. Problems inside a
            known format (bad boxes, unknown ids) are collected in ``LabelFile.problems`` instead.
    """
    problems = DataProblems()
    lower = str(path).lower()
    if lower.endswith(".zip") or not lower.endswith(".json"):
        if not lower.endswith(".zip") and not storage.exists(storage.join(path, "Annotations")):
            raise LabelFileError(
                f"{path}: not a labels file this tool reads: give a COCO or Label Studio .json, or a Pascal VOC "
                "folder or .zip (with Annotations/)"
            )
        return _read_voc(path, problems)
    try:
        content = json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as error:
        raise LabelFileError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}") from error
    if isinstance(content, dict) and "images" in content:
        return _read_coco(path, content, problems)
    if isinstance(content, dict) and "data" in content:
        content = [content]  # one Label Studio task
    if isinstance(content, list):
        return _read_labelstudio(path, content, problems)
    raise LabelFileError(
        f"{path}: neither a COCO object (images, annotations, categories) nor a list of Label Studio tasks"
    )
