"""Pool manifests: Parquet shards of ``image_id, uri, width, height`` that the distributed scorer reads."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa

from almdn_ray import storage
from almdn_ray.data.images import IMAGE_SUFFIXES, ImageReadError, image_size
from almdn_ray.data.records import Dataset

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST_SCHEMA", "rows_from_dataset", "rows_from_images", "write_manifest", "read_manifest"]

MANIFEST_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("uri", pa.string()), ("width", pa.int32()), ("height", pa.int32())]
)
Row = tuple[str, str, int, int]


def rows_from_dataset(dataset: Dataset) -> Iterator[Row]:
    """Manifest rows of a dataset split; sizes come from its annotations (no image is decoded)."""
    for record in dataset.records:
        yield record.image_id, record.uri, record.width, record.height


def rows_from_images(
    folder: str, *, pattern: str = "*", skipped: list[str] | None = None, on_image: Callable[[], None] | None = None
) -> Iterator[Row]:
    """Manifest rows of the image files under a folder (local or ``s3://``), matching ``pattern``.

    The image id is the path relative to the folder without its suffix; sizes are read from each image's
    header only. Unreadable files are logged and listed in ``skipped``, not fatal.
    """
    base = str(folder).rstrip("/")
    for uri in storage.list_files(folder, pattern=pattern):
        if not uri.lower().endswith(IMAGE_SUFFIXES):
            continue
        relative = uri[len(base) :].lstrip("/").replace("\\", "/")
        try:
            width, height = image_size(uri)
        except ImageReadError as error:
            logger.warning("skipped: %s", error)
            if skipped is not None:
                skipped.append(str(error))
            continue
        finally:
            if on_image is not None:
                on_image()
        yield posixpath.splitext(relative)[0], uri, width, height


def write_manifest(rows: Iterable[Row], out: str, *, rows_per_shard: int = 10_000) -> list[str]:
    """Write rows as ``out/manifest-00000.parquet`` … shards of at most ``rows_per_shard`` rows.

    Returns:
        The shard URIs. Raises ``ValueError`` on a duplicate image id or an empty pool.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    seen: set[str] = set()
    shards: list[str] = []
    batch: list[Row] = []

    def flush() -> None:
        columns = list(zip(*batch))
        table = pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(columns, MANIFEST_SCHEMA)], schema=MANIFEST_SCHEMA
        )
        uri = storage.join(out, f"manifest-{len(shards):05d}.parquet")
        storage.write_parquet(uri, table)
        shards.append(uri)
        batch.clear()

    for row in rows:
        if row[0] in seen:
            raise ValueError(f"duplicate image id {row[0]!r} ({row[1]}); image ids must be unique in a pool")
        seen.add(row[0])
        batch.append(row)
        if len(batch) == rows_per_shard:
            flush()
    if batch:
        flush()
    if not shards:
        raise ValueError(f"no images for the pool manifest at {out}; check the source folder, pattern or split")
    logger.info("wrote %d manifest rows in %d shard(s) to %s", len(seen), len(shards), out)
    return shards


def read_manifest(folder: str) -> pa.Table:
    """All shards of a manifest folder as one table, in shard order."""
    shards = [uri for uri in storage.list_files(folder, pattern="manifest-*.parquet")]
    if not shards:
        raise FileNotFoundError(f"{folder} has no manifest-*.parquet shards; build them with `almdn-ray pool build`")
    tables = [storage.read_parquet(uri).cast(MANIFEST_SCHEMA) for uri in shards]
    return pa.concat_tables(tables)
