"""Reading any supported dataset by its path, and checking it: ``almdn-ray data validate``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from almdn_ray import storage
from almdn_ray.data.coco import read_coco
from almdn_ray.data.images import ImageReadError, read_image
from almdn_ray.data.records import DataProblems, Dataset, DatasetError
from almdn_ray.data.voc import VOC_CLASSES, read_voc

__all__ = ["detect_format", "read_dataset", "ValidationReport", "validate_dataset"]


def detect_format(path: str) -> str:
    """``"coco"`` for a ``.json`` file, ``"voc"`` for a devkit folder, ``"images"`` for a folder of images."""
    if str(path).lower().endswith(".json"):
        return "coco"
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
    """Read a VOC devkit folder (``split``, default trainval) or a COCO JSON, detected from the path."""
    kind = detect_format(path)
    if kind == "coco":
        return read_coco(path, image_root=image_root)
    if kind == "voc":
        return read_voc(path, split=split or "trainval", classes=classes or VOC_CLASSES)
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
