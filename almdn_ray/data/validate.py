"""Reading any supported dataset by its path, and checking it: ``almdn-ray data validate``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from almdn_ray import storage
from almdn_ray.data.coco import read_coco
from almdn_ray.data.images import ImageReadError, read_image
from almdn_ray.data.records import DataProblems, Dataset, DatasetError
from almdn_ray.data.voc import read_voc

__all__ = ["detect_format", "read_dataset", "ValidationReport", "validate_dataset"]


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
    ``"voc"`` for a devkit folder (or a VOC ``.zip``), ``"images"`` for a folder of images."""
    lower = str(path).lower()
    if lower.endswith(".json"):
        return "labelstudio" if _starts_with_list(path) else "coco"
    if lower.endswith(".zip"):
        return "voc"
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} does not exist; give a VOC devkit folder, a COCO JSON or an image folder")
    if storage.exists(storage.join(path, "Annotations")) or any(
        storage.exists(storage.join(path, f"VOC20{y:02d}")) for y in range(5, 13)
    ):
        return "voc"
    return "images"


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

    @property
    def usable(self) -> bool:
        return (
            self.dataset is not None
            and not self.problems.errors
            and not self.unreadable_images
            and len(self.dataset.records) > 0
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
    """Read a dataset, collecting every problem, and (optionally) decode every image once."""
    kind = detect_format(path)
    try:
        dataset = read_dataset(path, split=split, classes=classes, image_root=image_root)
    except DatasetError as error:
        return ValidationReport(path, kind, None, error.problems)
    report = ValidationReport(path, kind, dataset, dataset.problems)
    if check_images:
        for record in dataset.records:
            try:
                image = read_image(record.uri)
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
