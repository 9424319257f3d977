"""The pool a run draws from: Arrow columns of every image, ground truth only for the images that have it.

A pool of ten million images is four Arrow columns (``image_id, uri, width, height``: the manifest schema),
never ten million Python objects; only labelled images become :class:`ImageRecord` s. The pool is a
manifest folder (``pool build`` output) with, optionally, a COCO JSON or VOC devkit holding the labels that
exist (``dataset.labels``), or a COCO JSON / VOC devkit that is pool and labels at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from almdn_ray.data.manifest import (
    MANIFEST_SCHEMA,
    dataset_table,
    is_manifest,
    read_manifest,
    read_marker,
    unfinished_build,
)
from almdn_ray.data.records import DataProblems, Dataset, DatasetError, ImageRecord, shortened
from almdn_ray.data.validate import read_dataset

logger = logging.getLogger(__name__)

__all__ = ["Pool", "load_pool"]


@dataclass
class Pool:
    """``table``: the manifest rows; ``classes``: label i is ``classes[i - 1]``; ``labels``: ground truth of
    the images that have it (every image for a simulation run, none for a team that has not labelled yet)."""

    table: pa.Table
    classes: tuple[str, ...]
    labels: dict[str, ImageRecord] = field(default_factory=dict)
    _sizes: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # read from headers (rows)

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def image_ids(self) -> pa.ChunkedArray:
        return self.table.column("image_id")

    def rows(self, ids: Sequence[str]) -> dict[str, tuple[str, int, int]]:
        """``image_id -> (uri, width, height)`` of the given ids; a missing id raises ``KeyError`` naming it.

        A pool built from a listing without sizes has them empty: they are read here from the image headers
        (in parallel, once per pool object), so the stages that need them (labelling export and import,
        training) have them; an image that cannot be read then raises :class:`ImageReadError` naming it.
        """
        wanted = pa.array(list(ids), pa.string())
        found = self.table.filter(pc.is_in(self.table.column("image_id"), wanted))
        out = dict(
            zip(
                found.column("image_id").to_pylist(),
                zip(*(found.column(c).to_pylist() for c in ("uri", "width", "height"))),
            )
        )
        missing = [i for i in ids if i not in out]
        if missing:
            raise KeyError(f"{len(missing)} image id(s) not in the pool: {shortened(missing, 10)}")
        unknown = [i for i, (uri, w, h) in out.items() if (w is None or h is None) and i not in self._sizes]
        if unknown:
            self._read_sizes({i: out[i][0] for i in unknown})
        return {
            i: (uri, *self._sizes[i]) if w is None or h is None else (uri, int(w), int(h))
            for i, (uri, w, h) in out.items()
        }

    def _read_sizes(self, uris: dict[str, str]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from almdn_ray.data.images import image_size

        logger.info("reading the sizes of %d pool images from their headers (the manifest has none)", len(uris))
        with ThreadPoolExecutor(max_workers=min(16, len(uris))) as threads:  # I/O bound: S3 round trips
            for image_id, size in zip(uris, threads.map(image_size, uris.values())):
                self._sizes[image_id] = size

    def records(self, ids: Sequence[str]) -> list[ImageRecord]:
        """Records of ``ids`` in that order: the ground truth where it exists, else no boxes."""
        rows = self.rows([i for i in ids if i not in self.labels])
        out = []
        for i in ids:
            if i in self.labels:
                out.append(self.labels[i])
            else:
                uri, width, height = rows[i]
                empty = np.zeros((0, 4), np.float32)
                out.append(ImageRecord(i, uri, width, height, empty, np.zeros(0, np.int64), np.zeros(0, bool)))
        return out

    def unlabelled_ids(self) -> pa.ChunkedArray:
        """Ids of the pool images that have no ground truth."""
        if not self.labels:
            return self.image_ids
        known = pa.array(list(self.labels), pa.string())
        return pc.filter(self.image_ids, pc.invert(pc.is_in(self.image_ids, known)))


def _labels_for(table: pa.Table, dataset: Dataset, source: str) -> dict[str, ImageRecord]:
    """The label records of ``dataset`` keyed by the manifest's ids (matched by id, else by URI)."""
    ids = set(table.column("image_id").to_pylist())
    by_uri = dict(zip(table.column("uri").to_pylist(), table.column("image_id").to_pylist()))
    out, unknown = {}, []
    for record in dataset.records:
        image_id = record.image_id if record.image_id in ids else by_uri.get(record.uri)
        if image_id is None:
            unknown.append(record.image_id)
            continue
        out[image_id] = record if image_id == record.image_id else _renamed(record, image_id)
    if unknown:
        problems = DataProblems()
        problems.error(
            f"{source}: {len(unknown)} labelled image(s) are not in the pool manifest (by id or URI), e.g. "
            f"{shortened(unknown, 5)}; add them to the pool (`almdn-ray pool build`) or remove them from the labels"
        )
        raise DatasetError(source, problems)
    return out


def _renamed(record: ImageRecord, image_id: str) -> ImageRecord:
    return ImageRecord(image_id, record.uri, record.width, record.height, record.boxes, record.labels, record.difficult)


def load_pool(dataset_spec, *, table: pa.Table | None = None) -> Pool:
    """The job's pool: ``table`` (the run's frozen manifest) or the job's source rows, and its labels.

    Classes come from the labels (a COCO file's categories, a VOC folder's classes) or ``dataset.classes``.
    A COCO / VOC pool without a single box has no labels (a team that has not labelled yet).

    Raises:
        DatasetError / ValueError: a manifest without ``dataset.classes`` or ``dataset.labels``, labels of
            images that are not in the pool.
    """
    d = dataset_spec
    if is_manifest(d.train):
        if table is None and read_marker(d.train) is None:
            raise ValueError(f"dataset.train {unfinished_build(d.train)}")
        rows = table if table is not None else read_manifest(d.train)
        if d.labels is None:
            if not d.classes:
                raise ValueError(
                    f"dataset.train {d.train} is a pool manifest without labels: give the class names in "
                    "dataset.classes (or the labels that exist in dataset.labels)"
                )
            return Pool(rows.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA), tuple(d.classes), {})
        labelled = read_dataset(d.labels, split=d.train_split, classes=d.classes, image_root=d.train_image_root)
        return Pool(rows.cast(MANIFEST_SCHEMA), labelled.classes, _labels_for(rows, labelled, d.labels))
    dataset = read_dataset(d.train, split=d.train_split, classes=d.classes, image_root=d.train_image_root)
    rows = table if table is not None else dataset_table(dataset)
    has_boxes = any(len(r.labels) for r in dataset.records)
    labels = {r.image_id: r for r in dataset.records} if has_boxes else {}
    if not has_boxes:
        logger.info("%s has no boxes: the pool has no labels yet", d.train)
    if d.labels is not None:
        raise ValueError(
            f"dataset.labels is for a pool manifest; dataset.train {d.train} holds its labels itself: remove "
            "dataset.labels, or make dataset.train the manifest (`almdn-ray pool build`)"
        )
    return Pool(rows.cast(MANIFEST_SCHEMA), dataset.classes, labels)
