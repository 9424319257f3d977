"""PASCAL VOC devkit reader: ``VOCdevkit/VOC2007`` (and ``VOC2012`` beside it for "07+12")."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np

from almdn_ray import storage
from almdn_ray.data.records import DataProblems, Dataset, ImageRecord, clip_boxes

__all__ = ["VOC_CLASSES", "read_voc", "find_voc_years"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def find_voc_years(root: str) -> list[str]:
    """The ``VOC20xx`` folders of a devkit root, or ``[""]`` when ``root`` is itself a year folder."""
    if storage.exists(storage.join(root, "Annotations")):
        return [""]
    years = sorted({uri.rstrip("/").split("/")[-1] for uri in _subfolders(root)} & _YEAR_NAMES)
    if not years:
        raise FileNotFoundError(
            f"{root} holds neither Annotations/ nor VOC20xx/ folders; give the VOCdevkit "
            "folder or one VOC20xx folder inside it"
        )
    return years


_YEAR_NAMES = {f"VOC20{y:02d}" for y in range(5, 13)}


def _subfolders(root: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{root} does not exist") from error
    return [info.path for info in infos if info.type == pafs.FileType.Directory]


def _text(node: ET.Element, path: str, where: str, problems: DataProblems) -> str | None:
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        problems.error(f"{where}: missing <{path}>; every annotation needs it")
        return None
    return found.text.strip()


def _read_annotation(
    uri: str, image_uri: str, image_id: str, class_index: dict[str, int], problems: DataProblems
) -> ImageRecord | None:
    try:
        root = ET.fromstring(storage.read_bytes(uri))
    except FileNotFoundError:
        problems.error(f"{uri}: annotation file is missing for image {image_id} listed in the split")
        return None
    except ET.ParseError as error:
        line, column = error.position
        problems.error(
            f"{uri}: malformed XML at line {line}, column {column} ({error.msg}); fix or remove the "
            "image from the split"
        )
        return None
    width, height = (_text(root, f"size/{key}", uri, problems) for key in ("width", "height"))
    if width is None or height is None:
        return None
    width, height = int(float(width)), int(float(height))
    boxes, labels, difficult = [], [], []
    for index, obj in enumerate(root.iter("object")):
        name = _text(obj, "name", f"{uri} object {index}", problems)
        if name is None:
            continue
        if name not in class_index:
            problems.error(
                f"{uri} object {index}: unknown class {name!r}; known classes: {sorted(class_index)} "
                "(give the dataset's class list)"
            )
            continue
        corners = [
            _text(obj, f"bndbox/{key}", f"{uri} object {index}", problems) for key in ("xmin", "ymin", "xmax", "ymax")
        ]
        if None in corners:
            continue
        xmin, ymin, xmax, ymax = (float(v) for v in corners)
        boxes.append([xmin - 1, ymin - 1, xmax, ymax])  # 1-based pixel indices -> continuous coordinates
        labels.append(class_index[name])
        flag = obj.find("difficult")
        difficult.append(flag is not None and (flag.text or "0").strip() == "1")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    keep = clip_boxes(boxes, width, height, uri, problems)
    return ImageRecord(
        image_id,
        image_uri,
        width,
        height,
        boxes[keep],
        np.asarray(labels, np.int64)[keep],
        np.asarray(difficult, bool)[keep],
    )


def read_voc(
    root: str, *, split: str = "trainval", years: Sequence[str] | None = None, classes: Sequence[str] = VOC_CLASSES
) -> Dataset:
    """Read a split of a VOC devkit.

    Args:
        root: the ``VOCdevkit`` folder (every ``VOC20xx`` inside is read, e.g. 07+12) or one ``VOC20xx``
            folder; a local path or ``s3://`` URI.
        split: the ``ImageSets/Main/<split>.txt`` list.
        years: which ``VOC20xx`` folders to read (default: all found).
        classes: class names, label i is ``classes[i - 1]``.

    Raises:
        DatasetError: listing every malformed file, unknown class, missing field, duplicate or empty split.
    """
    problems = DataProblems()
    class_index = {name: i + 1 for i, name in enumerate(classes)}
    records: list[ImageRecord] = []
    seen: set[str] = set()
    for year in years if years is not None else find_voc_years(root):
        folder = storage.join(root, year) if year else str(root)
        split_uri = storage.join(folder, "ImageSets", "Main", f"{split}.txt")
        try:
            ids = storage.read_bytes(split_uri).decode().split()
        except FileNotFoundError:
            problems.error(f"{split_uri}: split file is missing; check the split name ({split!r}) and the folder")
            continue
        if not ids:
            problems.error(f"{split_uri}: the split is empty; list one image id per line")
        for name in ids:
            image_id = f"{year}/{name}" if year else name
            if image_id in seen:
                problems.error(f"{split_uri}: image id {name!r} is listed twice; remove the duplicate line")
                continue
            seen.add(image_id)
            record = _read_annotation(
                storage.join(folder, "Annotations", f"{name}.xml"),
                storage.join(folder, "JPEGImages", f"{name}.jpg"),
                image_id,
                class_index,
                problems,
            )
            if record is not None:
                records.append(record)
    problems.raise_if_errors(str(root))
    problems.log_summary(str(root))
    return Dataset(records, tuple(classes), problems)
