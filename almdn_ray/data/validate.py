"""Reading any supported dataset by its path, and checking it: ``almdn-ray data validate``."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from almdn_ray import storage
from almdn_ray.data.coco import read_coco
from almdn_ray.data.images import ImageReadError, read_image
from almdn_ray.data.labelfiles import name_candidates
from almdn_ray.data.listing import listing_kind, suffix_kind
from almdn_ray.data.records import DataProblems, Dataset, DatasetError, normalise_name, shortened
from almdn_ray.data.voc import read_voc

if TYPE_CHECKING:
    import torch

__all__ = ["detect_format", "read_dataset", "ValidationReport", "validate_dataset", "report_lines", "shortened"]

FOUND_ELSEWHERE = "images found by another name (as `labels import` matches them)"
CASE_CLASH = "classes that differ only in case or surrounding space"


def _starts_with_list(path: str) -> bool:
    fs, inner = storage.resolve(path)
    try:
        with fs.open_input_stream(inner) as stream:
            head = stream.read(4096)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path} does not exist") from error
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def detect_format(path: str) -> str:
    """``"coco"`` for a COCO ``.json`` file, ``"labelstudio"`` for a Label Studio tasks ``.json`` (a list),
    ``"voc"`` for a devkit folder (or a VOC ``.zip``), ``"listing"`` for a listing of image URIs (a
    ``.parquet``, ``.csv`` or ``.jsonl`` file or a folder of them), ``"images"`` for a folder of images."""
    lower = str(path).lower()
    if lower.endswith(".json"):
        return "labelstudio" if _starts_with_list(path) else "coco"
    if suffix_kind(lower) is not None:
        if not storage.exists(path):
            raise FileNotFoundError(f"{path} does not exist")
        return "listing"
    if lower.endswith(".zip"):
        return "voc"
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} does not exist; give a VOC devkit folder, a COCO JSON or an image folder")
    if storage.exists(storage.join(path, "Annotations")) or any(
        storage.exists(storage.join(path, f"VOC20{y:02d}")) for y in range(5, 13)
    ):
        return "voc"
    return "listing" if listing_kind(path) is not None else "images"


def read_dataset(
    path: str, *, split: str | None = None, classes: Sequence[str] | None = None, image_root: str | None = None
) -> Dataset:
    """Read a VOC devkit folder (``split``: default trainval, or its only split), a COCO JSON, or a Label
    Studio JSON task export, detected from the path."""
    kind = detect_format(path)
    if kind == "coco":
        return read_coco(path, image_root=image_root)
    if kind == "labelstudio" or str(path).lower().endswith(".zip"):
        from almdn_ray.data.labelfiles import LabelFileError, label_file_dataset, read_label_file

        try:
            return label_file_dataset(read_label_file(path), image_root)
        except LabelFileError as error:
            problems = DataProblems()
            problems.error(str(error))
            raise DatasetError(path, problems) from error
    if kind == "voc":
        return read_voc(path, split=split, classes=classes)
    if kind == "listing":
        raise ValueError(
            f"{path} is a listing of images (Parquet, CSV or JSON lines), not an annotated dataset: make it a pool "
            f"manifest with `almdn-ray pool build {path} OUT` and give OUT (as dataset.train, or to `pool add`)"
        )
    raise ValueError(
        f"{path} is neither a COCO JSON nor a VOC devkit folder (it has no Annotations/ or "
        "VOC20xx/); for a plain image folder use `almdn-ray pool build`"
    )


@dataclass
class ValidationReport:
    """What ``validate`` found; ``usable`` is False when the dataset cannot be trained or evaluated on."""

    path: str
    kind: str
    dataset: Dataset | None
    problems: DataProblems
    unreadable_images: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)  # names as written, relative to image_root
    image_root: str = ""

    @property
    def usable(self) -> bool:
        return (
            self.dataset is not None
            and not self.problems.errors
            and not self.unreadable_images
            and not self.missing_images
            and not self.problems.counts.get(FOUND_ELSEWHERE)  # the readers take the name as written
            and len(self.dataset.records) > 0
        )


def _image_root(path: str, image_root: str | None) -> str:
    """The folder image names are relative to: ``image_root``, else the labels file's folder (as the readers do)."""
    if image_root is not None:
        return str(image_root).rstrip("/")
    if not str(path).lower().endswith(".json"):
        return ""  # VOC folder or zip: names are under JPEGImages/, see ``_fallbacks``
    return posixpath.dirname(path) if "://" in str(path) else os.path.dirname(os.path.abspath(path))


def _fallbacks(uri: str, root: str) -> list[str]:
    """Where else an image may be, as `labels import` matches names: the name without the tool's prefixes and
    upload hashes, then the basename, each under ``root`` (or the image's own folder)."""
    root = root or posixpath.dirname(uri)
    name = uri[len(root) + 1 :] if uri.startswith(root + "/") else posixpath.basename(uri)
    names = name_candidates(name)
    names += [posixpath.basename(n) for n in names]
    return [u for u in dict.fromkeys(storage.join(root, *n.split("/")) for n in names) if u != uri]


def _read_somewhere(uri: str, root: str, problems: DataProblems) -> tuple[str, torch.Tensor] | None:
    """``(uri, image [3, H, W])`` read at ``uri``, else at the first fallback there is (with a warning); None when the
    image is at none of them. Raises :class:`ImageReadError` for an image that is there but unreadable."""
    try:
        return uri, read_image(uri)
    except ImageReadError as error:
        if not isinstance(error.__cause__, FileNotFoundError):
            raise
    for other in _fallbacks(uri, root):
        if storage.exists(other):
            written, found = (u[len(root) + 1 :] if root and u.startswith(root + "/") else u for u in (uri, other))
            problems.warn(
                FOUND_ELSEWHERE,
                f"{written}: found as {found}; `run` reads the name as written, so rename it in the labels "
                "file (or move the image there)",
            )
            return other, read_image(other)
    return None


def _warn_case_clashes(dataset: Dataset, problems: DataProblems) -> None:
    """Warn once per group of classes whose names are equal with case and surrounding space ignored."""
    groups: dict[str, list[str]] = {}
    for name in dataset.classes:
        groups.setdefault(normalise_name(name), []).append(name)
    boxes = dataset.boxes_per_class()
    for names in (g for g in groups.values() if len(g) > 1):
        problems.warn(
            CASE_CLASH,
            f"{', '.join(f'{n!r} ({boxes[n]} boxes)' for n in names)} stay {len(names)} classes; `labels import` "
            f"takes a category by its exact name, and any other spelling as {names[-1]!r}; to merge them, rename "
            "them to one name in the labelling tool and export again",
        )


def validate_dataset(
    path: str,
    *,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    image_root: str | None = None,
    check_images: bool = True,
    on_image: Callable[[], None] | None = None,
) -> ValidationReport:
    """Read a dataset, collecting every problem, and (optionally) decode every image once.

    An image missing where the file names it is looked for as `labels import` matches names (the tool's
    prefixes and upload hashes undone, then the basename, under ``image_root`` or the file's folder); one
    found so is a warning and its record's ``uri`` in ``report.dataset`` is where it was found. Classes whose
    names differ only in case or surrounding space are a warning.
    """
    kind = detect_format(path)
    try:
        dataset = read_dataset(path, split=split, classes=classes, image_root=image_root)
    except DatasetError as error:
        return ValidationReport(path, kind, None, error.problems)
    report = ValidationReport(path, kind, dataset, dataset.problems, image_root=_image_root(path, image_root))
    _warn_case_clashes(dataset, report.problems)
    if check_images:
        for position, record in enumerate(dataset.records):
            try:
                found = _read_somewhere(record.uri, report.image_root, report.problems)
                if found is None:
                    root = report.image_root
                    report.missing_images.append(record.uri[len(root) + 1 :] if root else record.uri)
                else:
                    uri, image = found
                    record = dataset.records[position] = replace(record, uri=uri)
                    if tuple(image.shape[-2:]) != (record.height, record.width):
                        report.unreadable_images.append(
                            f"{record.uri}: image is {image.shape[-1]}x{image.shape[-2]}, annotation says "
                            f"{record.width}x{record.height}"
                        )
            except ImageReadError as error:
                report.unreadable_images.append(str(error))
            if on_image is not None:
                on_image()
    return report


def report_lines(report: ValidationReport, *, examples: int = 5) -> list[tuple[str, str]]:
    """What ``data validate`` prints after the summary: ``(level, line)`` with level ``warning`` or ``problem``.

    Warnings are counted per kind with the first ``examples``; missing images are one counted line.
    """
    lines = []
    for kind, count in sorted(report.problems.counts.items()):
        # An image found only by another name is not read by `run`, `pool build` or EVAL: a problem to fix.
        lines.append(("problem" if kind == FOUND_ELSEWHERE else "warning", f"{count} {kind}"))
        lines += [("", f"  {line}") for line in report.problems.examples(kind, examples)]
        if count > examples:
            lines.append(("", f"  … and {count - examples} more"))
    lines += [("problem", line) for line in report.problems.errors + report.unreadable_images]
    if report.missing_images:
        where = f"under {report.image_root}" if report.image_root else "where the labels file says"
        lines.append(
            (
                "problem",
                f"{len(report.missing_images)} images missing, e.g. {shortened(report.missing_images)} (looked "
                f"{where}, also by basename); put the images there"
                + (" or pass --image-root" if report.image_root else ""),
            )
        )
    return lines
