"""The one record form every dataset reader produces, and the problems a reader found."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "ImageRecord", "Prediction", "Dataset", "DataProblems", "DatasetError", "clip_boxes", "normalise_name",
]  # fmt: skip


@dataclass(frozen=True)
class Prediction:
    """One model detection offered to the labeller: ``box`` xyxy in the image's pixels, ``label`` 1..C."""

    box: tuple[float, float, float, float]
    label: int
    score: float


@dataclass(frozen=True)
class ImageRecord:
    """One image and its ground truth.

    ``boxes [G, 4]`` float32 xyxy in continuous pixel coordinates of the stored image; ``labels [G]`` int64
    in 1..num_classes-1 (0 is background); ``difficult [G]`` bool marks boxes that are excluded from training
    and count neither way in evaluation (VOC "difficult", COCO "iscrowd").
    """

    image_id: str
    uri: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray

    def __post_init__(self):
        assert self.boxes.shape == (len(self.labels), 4), (self.image_id, self.boxes.shape)
        assert self.difficult.shape == self.labels.shape, (self.image_id, self.difficult.shape)


@dataclass
class DataProblems:
    """What a reader found: fatal ``errors`` (file: message) and counted, repaired ``warnings`` (kind, message)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def error(self, message: str) -> None:
        self.errors.append(message)

    def warn(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        self.warnings.append((kind, message))

    def examples(self, kind: str, limit: int = 5) -> list[str]:
        return [message for k, message in self.warnings if k == kind][:limit]

    def raise_if_errors(self, source: str) -> None:
        if self.errors:
            raise DatasetError(source, self)

    def log_summary(self, source: str) -> None:
        for kind, count in sorted(self.counts.items()):
            logger.warning(
                "%s: %d %s (first: %s)", source, count, kind, next((m for k, m in self.warnings if k == kind), "")
            )


def shortened(items: Sequence, limit: int = 3) -> str:
    """``"a, b, c … and N more"``: the first ``limit`` items (as ``str``), and how many were left out."""
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(str(i) for i in list(items)[:limit]) + more


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message lists every error found, with its file."""

    def __init__(self, source: str, problems: DataProblems):
        self.source = source
        self.problems = problems
        shown = "\n  ".join(problems.errors[:20])
        more = f"\n  … and {len(problems.errors) - 20} more" if len(problems.errors) > 20 else ""
        super().__init__(f"{source}: {len(problems.errors)} problem(s) make the dataset unusable:\n  {shown}{more}")


@dataclass(frozen=True)
class Dataset:
    """Records of one split, the class names (label i is ``classes[i - 1]``) and what the reader found."""

    records: list[ImageRecord]
    classes: tuple[str, ...]
    problems: DataProblems = field(default_factory=DataProblems)
    category_ids: tuple[int, ...] | None = None  # COCO: label i was category_ids[i - 1]

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.classes) + 1

    def with_classes(self, classes: Sequence[str], source: str) -> Dataset:
        """This split with its labels renumbered to ``classes`` by name (case and surrounding space ignored).

        Two splits exported by one tool may number their classes differently (FiftyOne does): a test split is
        matched to the pool's classes by name, never by id. Raises :class:`DatasetError` naming the classes
        the target lacks.
        """
        if tuple(classes) == self.classes:
            return self
        target = {normalise_name(name): i + 1 for i, name in enumerate(classes)}
        problems = DataProblems()
        mapping = np.zeros(len(self.classes) + 1, np.int64)
        for i, name in enumerate(self.classes):
            label = target.get(normalise_name(name))
            if label is None:
                problems.error(
                    f"{source}: class {name!r} is not one of the pool's classes {list(classes)}; the splits must "
                    "name the same classes"
                )
                continue
            mapping[i + 1] = label
        problems.raise_if_errors(source)
        if any(mapping[i + 1] != i + 1 for i in range(len(self.classes))) or len(classes) != len(self.classes):
            logger.warning(
                "%s: classes renumbered by name to the pool's (%s -> %s)", source, list(self.classes), list(classes)
            )
        records = [replace(r, labels=mapping[r.labels]) for r in self.records]
        return Dataset(records, tuple(classes), self.problems, None)

    def boxes_per_class(self) -> dict[str, int]:
        counts = Counter()
        for record in self.records:
            counts.update(record.labels.tolist())
        return {name: counts.get(i + 1, 0) for i, name in enumerate(self.classes)}


def normalise_name(name: str) -> str:
    """A class name as compared across tools: surrounding space dropped, inner runs of space as one, case folded."""
    return " ".join(str(name).split()).casefold()


def clip_boxes(boxes: np.ndarray, width: int, height: int, where: str, problems: DataProblems) -> np.ndarray:
    """Clip boxes to the image, counting clipped ones; return the mask of boxes that keep a positive area."""
    clipped = boxes.copy()
    np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
    for index in np.flatnonzero(np.any(clipped != boxes, axis=1)):
        problems.warn(
            "boxes clipped to the image", f"{where}: box {index} {boxes[index].tolist()} clipped to {width}x{height}"
        )
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    for index in np.flatnonzero(~keep):
        problems.warn(
            "empty boxes dropped",
            f"{where}: box {index} {boxes[index].tolist()} is empty inside the {width}x{height} image and was dropped",
        )
    boxes[:] = clipped
    return keep
