"""PASCAL VOC devkit reader: ``VOCdevkit/VOC2007`` (and ``VOC2012`` beside it for "07+12")."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence

import numpy as np

from almdn_ray import storage
from almdn_ray.data.records import DataProblems, Dataset, ImageRecord, clip_boxes

logger = logging.getLogger(__name__)

__all__ = ["VOC_CLASSES", "IMAGE_EXTENSIONS", "read_voc", "read_labelmap", "find_voc_years"]

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
    uri: str,
    image_of: Callable[[str | None], str],
    image_id: str,
    class_index: dict[str, int],
    problems: DataProblems,
    one_based: bool = True,
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
    filename = root.findtext("filename")
    image_uri = image_of(filename.strip() if filename and filename.strip() else None)
    width, height = (_text(root, f"size/{key}", uri, problems) for key in ("width", "height"))
    if width is None or height is None:
        return None
    raw = (width, height)
    try:
        width, height = int(float(width)), int(float(height))
    except (OverflowError, ValueError):
        width = height = 0
    if width < 1 or height < 1:
        problems.error(f"{uri}: <size> {raw[0]!r} x {raw[1]!r} is not a positive image size; fix the XML")
        return None
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
        shift = 1.0 if one_based else 0.0  # classic VOC: 1-based pixel indices; CVAT/Datumaro: continuous
        boxes.append([xmin - shift, ymin - shift, xmax, ymax])
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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_labelmap(folder: str) -> tuple[str, ...] | None:
    """The classes of a CVAT/Datumaro ``labelmap.txt`` (``name:r,g,b:parts:actions`` lines; ``background``
    is not a detection class), or None when the folder has none."""
    uri = storage.join(folder, "labelmap.txt")
    if not storage.exists(uri):
        return None
    names = []
    for line in storage.read_bytes(uri).decode("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split(":", 1)[0].strip()
        if name and name.lower() != "background" and name not in names:
            names.append(name)
    return tuple(names)


def _split_file(folder: str, split: str | None, problems: DataProblems) -> str | None:
    """``ImageSets/Main/<split>.txt``; with no split given, ``trainval.txt`` or else the only split file there."""
    main = storage.join(folder, "ImageSets", "Main")
    if split is not None:
        return storage.join(main, f"{split}.txt")
    default = storage.join(main, "trainval.txt")
    if storage.exists(default):
        return default
    try:
        found = storage.list_files(main, pattern="*.txt")
    except FileNotFoundError:
        found = []
    lists = [uri for uri in found if "_" not in uri.rsplit("/", 1)[-1]]  # not the per-class <class>_<split>.txt
    if len(lists) == 1:
        logger.info("%s: no trainval.txt; reading the only split, %s", folder, lists[0].rsplit("/", 1)[-1])
        return lists[0]
    problems.error(
        f"{main}: no trainval.txt and {len(lists)} other split files ({[u.rsplit('/', 1)[-1] for u in lists]}); "
        "give the split (dataset.train_split, or --split)"
    )
    return None


def _image_resolver(folder: str) -> Callable[[str, str | None], str]:
    """Where an annotation's image is: its ``<filename>`` in ``JPEGImages/`` when that file exists, else
    ``<id>`` with the usual extensions, else ``<filename>`` (or ``<id>.jpg``) as named."""
    images = storage.join(folder, "JPEGImages")
    try:
        present = {uri.rsplit("/", 1)[-1]: uri for uri in storage.list_files(images)}
    except FileNotFoundError:
        present = {}

    def resolve(name: str, filename: str | None) -> str:
        if filename is not None:
            base = filename.replace("\\", "/").rsplit("/", 1)[-1]
            if base in present:
                return present[base]
        for extension in IMAGE_EXTENSIONS:
            for candidate in (name + extension, name + extension.upper()):
                if candidate in present:
                    return present[candidate]
        return storage.join(images, filename.replace("\\", "/").rsplit("/", 1)[-1] if filename else f"{name}.jpg")

    return resolve


def read_voc(
    root: str,
    *,
    split: str | None = None,
    years: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Read a split of a VOC devkit (or of a CVAT / Datumaro "Pascal VOC" export).

    Args:
        root: the ``VOCdevkit`` folder (every ``VOC20xx`` inside is read, e.g. 07+12) or one ``VOC20xx``
            folder; a local path or ``s3://`` URI.
        split: the ``ImageSets/Main/<split>.txt`` list (default: ``trainval``, or the only split file there,
            e.g. CVAT's ``default``).
        years: which ``VOC20xx`` folders to read (default: all found).
        classes: class names, label i is ``classes[i - 1]`` (default: the folder's ``labelmap.txt``, else
            the 20 VOC classes).

    Images are found by each XML's ``<filename>``, then by the id with the usual extensions. Coordinates are
    1-based pixel indices (classic VOC) unless the folder has a ``labelmap.txt``: CVAT and Datumaro write
    and read them as continuous coordinates.

    Raises:
        DatasetError: listing every malformed file, unknown class, missing field, duplicate or empty split.
    """
    problems = DataProblems()
    records: list[ImageRecord] = []
    seen: set[str] = set()
    found_classes: tuple[str, ...] | None = tuple(classes) if classes is not None else None
    for year in years if years is not None else find_voc_years(root):
        folder = storage.join(root, year) if year else str(root)
        labelmap = read_labelmap(folder)
        if found_classes is None:
            found_classes = labelmap if labelmap else VOC_CLASSES
        class_index = {name: i + 1 for i, name in enumerate(found_classes)}
        split_uri = _split_file(folder, split, problems)
        if split_uri is None:
            continue
        try:
            ids = storage.read_bytes(split_uri).decode().split()
        except FileNotFoundError:
            problems.error(f"{split_uri}: split file is missing; check the split name ({split!r}) and the folder")
            continue
        if not ids:
            problems.error(f"{split_uri}: the split is empty; list one image id per line")
        image_at = _image_resolver(folder)
        for name in ids:
            image_id = f"{year}/{name}" if year else name
            if image_id in seen:
                problems.error(f"{split_uri}: image id {name!r} is listed twice; remove the duplicate line")
                continue
            seen.add(image_id)
            record = _read_annotation(
                storage.join(folder, "Annotations", f"{name}.xml"),
                lambda filename, name=name, at=image_at: at(name, filename),
                image_id,
                class_index,
                problems,
                one_based=labelmap is None,
            )
            if record is not None:
                records.append(record)
    problems.raise_if_errors(str(root))
    problems.log_summary(str(root))
    return Dataset(records, found_classes or VOC_CLASSES, problems)
