"""Human labelling: export the selection for a labelling tool, import the tool's labels back (checked first).

Export (:func:`export_labels`) writes the images selected in the cycle waiting for labels in the form a tool
takes: a COCO skeleton, Label Studio tasks with the model's detections as ``predictions``, or a COCO file
CVAT imports with the detections as pre-annotations; always a CSV of the images. Import (:func:`import_labels`)
reads what the tools export (COCO from Label Studio, CVAT, Roboflow or FiftyOne; Label Studio JSON tasks; a
Pascal VOC folder or zip from CVAT: see :mod:`almdn_ray.data.labelfiles`), matches its images to the
selection, checks every box and class, and stores ``cycles/NNN/labels.json`` only when nothing is wrong.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

import numpy as np

from almdn_ray import storage
from almdn_ray.data.labelfiles import (
    MULTIPLE_ANNOTATIONS_POLICY,
    FileImage,
    LabelFile,
    LabelFileError,
    name_candidates,
    read_label_file,
)
from almdn_ray.data.records import DataProblems, ImageRecord, Prediction, normalise_name, shortened
from almdn_ray.layout import RunLayout, labeled_ids
from almdn_ray.state import load_state

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMATS", "LabelImportError", "ImportSummary", "Prediction", "awaiting_cycle", "export_labels",
    "import_labels", "import_label_file", "imported_labels", "labelstudio_tasks", "labelstudio_config",
    "export_names", "predict_selection", "Awaited", "awaiting", "awaited_ids",
]  # fmt: skip

EXPORT_FORMATS = ("coco", "labelstudio", "cvat")
OVERRUN_TOLERANCE_PX = 1.0  # a box past the image edge by at most this is clipped (tools round), else an error


class LabelImportError(ValueError):
    """A labels file that cannot be imported; nothing was changed."""


@dataclass(frozen=True)
class Awaited:
    """What a run waits for: the labels of ``selection`` (a Parquet of image ids), to be stored at ``labels``.

    ``cold``: the initial labelled set of a pool without labels (cycle 0, before any training).
    """

    cycle: int
    selection: str
    labels: str
    cold: bool


def awaiting(run: str) -> Awaited:
    state = load_state(run)
    if state is None:
        raise FileNotFoundError(f"{run}: no run here (no state.json); start one with `almdn-ray run JOB.yaml`")
    if state.status != "awaiting_labels":
        raise LabelImportError(
            f"{run}: the run is {state.status} (cycle {state.cycle}, stage {state.stage}), not waiting for labels"
        )
    layout, k = RunLayout(run), state.cycle
    if state.stage == "train":
        return Awaited(k, layout.cycle(k, "labeled.parquet"), layout.initial_labels, True)
    return Awaited(k, layout.cycle(k, "selected.parquet"), layout.cycle(k, "labels.json"), False)


def awaiting_cycle(run: str) -> int:
    return awaiting(run).cycle


def awaited_ids(run: str) -> list[str]:
    """The image ids a run waits for the labels of."""
    return storage.read_parquet(awaiting(run).selection).column("image_id").to_pylist()


# ---- export ---------------------------------------------------------------------------------------------------
def export_names(records: Sequence[ImageRecord], image_root: str | None) -> dict[str, str]:
    """``image_id -> file name`` for a tool: the URI relative to ``image_root`` when under it, else the URI."""
    root = str(image_root).rstrip("/") + "/" if image_root else None
    return {
        r.image_id: r.uri[len(root) :] if root and r.uri.startswith(root) and len(r.uri) > len(root) else r.uri
        for r in records
    }


def _labelstudio_url(uri: str, name: str, url_prefix: str | None) -> str:
    if url_prefix is not None:
        return url_prefix + name
    if storage.is_remote(uri) or "://" in uri:
        return uri  # Label Studio resolves s3:// (and gs://, azure-blob://) keys through its cloud storage
    return "/data/local-files/?d=" + name  # served with LOCAL_FILES_DOCUMENT_ROOT set to the image root


def labelstudio_config(classes: Sequence[str]) -> str:
    """The labelling config of a Label Studio project for the run: one ``RectangleLabels`` ``label`` on the
    ``Image`` ``image``, a label per class."""
    labels = "\n".join(f"    <Label value={quoteattr(name)}/>" for name in classes)
    return (
        '<View>\n  <Image name="image" value="$image"/>\n  <RectangleLabels name="label" toName="image">\n'
        f"{labels}\n  </RectangleLabels>\n</View>\n"
    )


def labelstudio_tasks(records, names, scores, predictions, classes, k, url_prefix) -> list[dict]:
    """Label Studio tasks of ``records``: ``data`` (``image`` URL, ``almdn_image_id``, ``width``, ``height``) and,
    when ``predictions`` is given, the detections as one prediction per task in percent of the image."""
    tasks = []
    for r in records:
        task = {
            "data": {
                "image": _labelstudio_url(r.uri, names[r.image_id], url_prefix),
                "almdn_image_id": r.image_id,
                "width": r.width,
                "height": r.height,
            }
        }
        if predictions is not None:
            result = []
            for n, p in enumerate(predictions.get(r.image_id, [])):
                x1, y1, x2, y2 = p.box
                result.append(
                    {
                        "id": f"almdn-{n}",
                        "type": "rectanglelabels",
                        "from_name": "label",
                        "to_name": "image",
                        "original_width": r.width,
                        "original_height": r.height,
                        "image_rotation": 0,
                        "value": {
                            "x": 100 * x1 / r.width,
                            "y": 100 * y1 / r.height,
                            "width": 100 * (x2 - x1) / r.width,
                            "height": 100 * (y2 - y1) / r.height,
                            "rotation": 0,
                            "rectanglelabels": [classes[p.label - 1]],
                        },
                        "score": p.score,
                    }
                )
            task["predictions"] = [
                {"model_version": f"almdn-ray cycle {k}", "score": scores.get(r.image_id), "result": result}
            ]
        tasks.append(task)
    return tasks


def _coco_export(records, names, classes, k, run, predictions, *, cvat: bool) -> dict:
    images, annotations = [], []
    for n, r in enumerate(records, start=1):
        images.append(
            {
                "id": n,
                "file_name": names[r.image_id],
                "width": r.width,
                "height": r.height,
                "almdn_image_id": r.image_id,
            }
        )
        for p in (predictions or {}).get(r.image_id, []):
            x1, y1, x2, y2 = p.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": n,
                    "category_id": p.label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "segmentation": [],
                    "score": p.score,
                    **({"attributes": {"occluded": False, "rotation": 0.0}} if cvat else {}),
                }
            )
    out = {"info": {"description": f"almdn-ray selection, cycle {k}", "run": run}}
    if cvat:
        out["licenses"] = [{"name": "", "id": 0, "url": ""}]
    out.update(
        images=images,
        annotations=annotations,
        categories=[{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(classes)],
    )
    return out


def export_labels(
    run: str,
    pool,
    *,
    fmt: str = "coco",
    image_root: str | None = None,
    url_prefix: str | None = None,
    predictions: Mapping[str, Sequence[Prediction]] | None = None,
) -> dict[str, str]:
    """Write the cycle's selection for labelling under ``cycles/NNN/export/``.

    Args:
        fmt: ``coco`` (``to_label.json``: images and categories, no annotations), ``labelstudio``
            (``to_label.labelstudio.json`` tasks, with ``predictions`` when given, and the project's
            ``labelstudio-config.xml``) or ``cvat`` (``to_label.cvat.json``: COCO with the predictions as
            annotations, which CVAT imports as pre-annotations).
        image_root: file names are written relative to this folder (URIs outside it stay whole).
        url_prefix: Label Studio: ``data.image`` is this + the file name (default: the URI for object
            storage, ``/data/local-files/?d=<file name>`` for local files).
        predictions: ``image_id -> detections`` to offer as pre-annotations.

    Returns:
        ``{"labels": tool file, "csv": image list, ["config": Label Studio labelling config]}``.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    layout = RunLayout(run)
    waited = awaiting(run)
    k = waited.cycle
    selection = storage.read_parquet(waited.selection)
    wanted = selection.column("image_id").to_pylist()
    scores = dict(zip(wanted, selection.column("score").to_pylist())) if "score" in selection.column_names else {}
    records = pool.records(wanted)
    names = export_names(records, image_root)
    out = {}
    if fmt == "labelstudio":
        tasks = labelstudio_tasks(records, names, scores, predictions, pool.classes, k, url_prefix)
        out["labels"] = layout.cycle(k, "export", "to_label.labelstudio.json")
        storage.write_json(out["labels"], tasks)
        out["config"] = layout.cycle(k, "export", "labelstudio-config.xml")
        storage.write_bytes(out["config"], labelstudio_config(pool.classes).encode())
    else:
        coco = _coco_export(
            records, names, pool.classes, k, run, predictions if fmt == "cvat" else None, cvat=fmt == "cvat"
        )
        if image_root:
            coco["info"]["image_root"] = str(image_root)
        out["labels"] = layout.cycle(k, "export", "to_label.json" if fmt == "coco" else "to_label.cvat.json")
        storage.write_json(out["labels"], coco)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image_id", "uri", "file_name", "width", "height"])
    writer.writerows([r.image_id, r.uri, names[r.image_id], r.width, r.height] for r in records)
    out["csv"] = layout.cycle(k, "export", "to_label.csv")
    storage.write_bytes(out["csv"], text.getvalue().encode())
    return out


# ---- import ---------------------------------------------------------------------------------------------------
@dataclass
class ImportSummary:
    format: str
    images: int
    boxes: int
    problems: DataProblems = field(default_factory=DataProblems)


class _Matcher:
    """Finds the selected image a file's image stands for: exported id, then file path, then basename, then
    the name without its extension; ambiguous and unmatched ones are reported by name."""

    def __init__(self, records: Sequence[ImageRecord]):
        self.ids = {r.image_id for r in records}
        self.paths: dict[str, set[str]] = {}
        self.bases: dict[str, set[str]] = {}
        self.stems: dict[str, set[str]] = {}
        for r in records:
            parts = [p for p in r.uri.replace("\\", "/").split("/") if p]
            for n in range(1, len(parts) + 1):
                self.paths.setdefault("/".join(parts[-n:]), set()).add(r.image_id)
            self.bases.setdefault(parts[-1], set()).add(r.image_id)
            self.stems.setdefault(posixpath.splitext(parts[-1])[0], set()).add(r.image_id)

    def match(self, image: FileImage) -> tuple[str | None, str | None]:
        """``(image_id, None)`` or ``(None, why not)``."""
        if image.exported_id is not None:
            if image.exported_id in self.ids:
                return image.exported_id, None
            return None, f"has almdn_image_id {image.exported_id!r}, which was not selected in this cycle"
        candidates = [c for name in image.names for c in name_candidates(name)]
        for table, key in (
            (self.paths, lambda c: c),
            (self.bases, lambda c: c.rsplit("/", 1)[-1]),
            (self.stems, lambda c: posixpath.splitext(c.rsplit("/", 1)[-1])[0]),
        ):
            for candidate in candidates:
                found = table.get(key(candidate), set())
                if len(found) == 1:
                    return next(iter(found)), None
                if len(found) > 1:
                    return None, f"is ambiguous: {key(candidate)!r} names several selected images {sorted(found)[:5]}"
        return None, f"matches no selected image (names tried: {candidates or image.names})"


def _categories(labels: LabelFile, classes: Sequence[str], problems: DataProblems) -> dict[str, int]:
    """``category name in the file -> label`` for the file's names that are classes of the run."""
    exact = {name: i + 1 for i, name in enumerate(classes)}
    loose = {normalise_name(name): i + 1 for i, name in enumerate(classes)}
    used = {box.category for image in labels.images for box in image.boxes if box.category is not None}
    out = {}
    for name in dict.fromkeys([*labels.categories, *used]):
        if name in exact:
            out[name] = exact[name]
        elif normalise_name(name) in loose:
            out[name] = loose[normalise_name(name)]
            problems.warn(
                "category names matched after normalising case and space",
                f"{labels.source}: category {name!r} taken as class {classes[out[name] - 1]!r}",
            )
        elif name not in used:
            problems.warn(
                "unknown categories without boxes ignored",
                f"{labels.source}: category {name!r} is not a class of the run and has no boxes",
            )
    return out


def _check_box(box, record: ImageRecord, frame, where: str, problems: DataProblems):
    """The box in the record's pixels (clipped when it overruns by <= 1 px), or None after an error."""
    if box.problem is not None:
        problems.error(f"{where}: {box.problem}")
        return None
    if not all(np.isfinite(box.xyxy)):
        problems.error(f"{where}: coordinates {list(box.xyxy)} are not finite numbers")
        return None
    x1, y1, x2, y2 = box.xyxy
    sx, sy = record.width / frame[0], record.height / frame[1]
    x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
    if x2 <= x1 or y2 <= y1:
        problems.error(f"{where}: box {list(box.xyxy)} is empty (width or height <= 0)")
        return None
    tolerance = OVERRUN_TOLERANCE_PX * (max(sx, sy, 1.0) if frame != (1.0, 1.0) else 1.0)
    overrun = max(-x1, -y1, x2 - record.width, y2 - record.height)
    if overrun > tolerance:
        problems.error(
            f"{where}: box {[round(v, 2) for v in (x1, y1, x2, y2)]} lies {overrun:.1f} px outside the "
            f"{record.width}x{record.height} image"
        )
        return None
    if overrun > 0:
        problems.warn(
            "boxes over the image edge by <= 1 px clipped",
            f"{where}: box {[round(v, 2) for v in (x1, y1, x2, y2)]} clipped to {record.width}x{record.height}",
        )
        x1, y1 = max(x1, 0.0), max(y1, 0.0)
        x2, y2 = min(x2, float(record.width)), min(y2, float(record.height))
    return [x1, y1, x2, y2]


def import_labels(run: str, path: str, pool) -> ImportSummary:
    """Check a labelling tool's export against the selection and store it as ``cycles/NNN/labels.json``.

    Every selected image must be in the file exactly once (with zero or more boxes) and no other image;
    categories are matched to the run's classes by name; boxes must be finite, non-empty and inside the
    image (up to 1 px over the edge is clipped, with a warning). Any problem raises
    :class:`LabelImportError` listing each one by image and annotation, and nothing is written.
    """
    awaiting(run)  # a run that waits for no labels is the first thing to say
    try:
        labels = read_label_file(path)
    except (LabelFileError, FileNotFoundError) as error:
        raise LabelImportError(str(error)) from error
    return import_label_file(run, labels, pool)


def import_label_file(run: str, labels: LabelFile, pool) -> ImportSummary:
    """:func:`import_labels` of labels already read (``labels.source`` names them in every message)."""
    layout = RunLayout(run)
    waited = awaiting(run)
    k = waited.cycle
    path = labels.source
    problems = labels.problems
    selected = storage.read_parquet(waited.selection).column("image_id").to_pylist()
    by_id = {r.image_id: r for r in pool.records(selected)}
    matcher = _Matcher(list(by_id.values()))
    label_of = _categories(labels, pool.classes, problems)
    imported: dict[str, list[dict]] = {}
    source_of: dict[str, str] = {}
    earlier = set() if waited.cold else set(labeled_ids(layout, k))
    for image in labels.images:
        if image.exported_id is not None and image.exported_id in earlier:
            problems.warn(  # one labelling project for every cycle: its export holds the earlier cycles' too
                "images labelled in an earlier cycle ignored", f"{path}: {image.where} ({image.exported_id})"
            )
            continue
        image_id, why = matcher.match(image)
        if image_id is None:
            problems.error(f"{path}: {image.where} {why}; import only the images exported for cycle {k}")
            continue
        if image_id in imported:
            problems.error(f"{path}: {image.where} and {source_of[image_id]} are both image {image_id}; keep one")
            continue
        record, boxes = by_id[image_id], []
        frame = image.size or (record.width, record.height)
        if image.size is not None and image.size != (1.0, 1.0) and image.size != (record.width, record.height):
            problems.warn(
                "boxes rescaled from the tool's image size",
                f"{path}: {image.where} is {image.size[0]:g}x{image.size[1]:g} in the file, "
                f"{record.width}x{record.height} in the pool",
            )
        for box in image.boxes:
            where = f"{path}: {image.where} (image {image_id}) {box.where}"
            xyxy = _check_box(box, record, frame, where, problems)
            if xyxy is None:
                continue
            if box.category not in label_of:
                problems.error(
                    f"{where}: category {box.category!r} is not a class of the run; known: {list(pool.classes)}"
                )
                continue
            boxes.append(
                {"bbox": xyxy, "label": label_of[box.category], **({"difficult": True} if box.difficult else {})}
            )
        imported[image_id], source_of[image_id] = boxes, image.where
    missing = [i for i in selected if i not in imported]
    if missing:
        problems.error(f"{path}: {len(missing)} selected image(s) are missing from the file: {shortened(missing, 10)}")
    if problems.errors:
        shown = "\n  ".join(problems.errors[:30])
        more = f"\n  … and {len(problems.errors) - 30} more" if len(problems.errors) > 30 else ""
        raise LabelImportError(f"{path}: {len(problems.errors)} problem(s), nothing imported:\n  {shown}{more}")
    summary = ImportSummary(labels.format, len(imported), sum(len(v) for v in imported.values()), problems)
    storage.write_json(
        waited.labels.replace(".json", "-import.json"),
        {
            "source": path,
            "format": labels.format,
            "images": summary.images,
            "boxes": summary.boxes,
            "warnings": {kind: problems.examples(kind, 20) for kind in problems.counts},
            "policy": MULTIPLE_ANNOTATIONS_POLICY if labels.format == "labelstudio" else None,
        },
    )
    storage.write_json(waited.labels, imported)  # the commit: the run continues from it
    return summary


def _read_hand_labels(uri: str, pool) -> dict[str, ImageRecord]:
    if not storage.exists(uri):
        return {}
    stored = storage.read_json(uri)
    rows = pool.rows(list(stored))
    out = {}
    for image_id, boxes in stored.items():
        image_uri, width, height = rows[image_id]
        out[image_id] = ImageRecord(
            image_id,
            image_uri,
            width,
            height,
            np.asarray([b["bbox"] for b in boxes], np.float32).reshape(-1, 4),
            np.asarray([b["label"] for b in boxes], np.int64),
            np.asarray([bool(b.get("difficult", False)) for b in boxes], bool),
        )
    return out


def imported_labels(layout: RunLayout, k: int, pool) -> dict[str, ImageRecord]:
    """Records of every image labelled by hand before cycle ``k`` trains: a cold start's initial set, then
    each earlier cycle's import."""
    out = _read_hand_labels(layout.initial_labels, pool)
    for j in range(k):
        out.update(_read_hand_labels(layout.cycle(j, "labels.json"), pool))
    return out


def predict_selection(
    run: str,
    pool,
    spec,
    *,
    min_score: float = 0.5,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, list[Prediction]]:
    """The cycle's model's detections on the images waiting for labels, in each image's pixels."""
    import torch

    from almdn_ray import scoring

    layout = RunLayout(run)
    waited = awaiting(run)
    model_uri = layout.cycle(waited.cycle, "train", "model.pt")
    if not storage.exists(model_uri):
        raise FileNotFoundError(f"{model_uri} is missing: no model to pre-annotate with (use --no-predictions)")
    model = scoring.load_model(spec, model_uri, "cuda" if torch.cuda.is_available() else "cpu")
    records = pool.records(awaited_ids(run))
    return scoring.detect_records(model, records, min_score=min_score, batch_size=batch_size, on_batch=on_batch)
