"""Pool manifests: Parquet shards of ``image_id, uri, width, height`` that the distributed scorer reads."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from almdn_ray import storage
from almdn_ray.data.images import IMAGE_SUFFIXES, ImageReadError, image_size
from almdn_ray.data.records import Dataset, shortened

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_SCHEMA", "MARKER", "rows_from_dataset", "rows_from_images", "rows_from_uris", "write_manifest",
    "write_manifest_table", "read_manifest", "read_marker", "write_marker", "is_manifest", "manifest_shards",
    "manifest_rows", "check_unique_ids", "rows_table", "build_image_manifest", "build_image_shard", "dataset_table",
    "prefix_ids", "unfinished_build",
]  # fmt: skip

MANIFEST_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("uri", pa.string()), ("width", pa.int32()), ("height", pa.int32())]
)
Row = tuple[str, str, int, int]


def rows_table(rows: Sequence[Row]) -> pa.Table:
    """Manifest rows ``(image_id, uri, width, height)`` as an Arrow table of :data:`MANIFEST_SCHEMA`."""
    columns = list(zip(*rows)) if rows else [[]] * len(MANIFEST_SCHEMA)
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, MANIFEST_SCHEMA)], schema=MANIFEST_SCHEMA
    )


def prefix_ids(table: pa.Table, prefix: str) -> pa.Table:
    """``table`` with ``prefix`` put before every image id (``""``: unchanged), e.g. ``week2/`` so that a new
    batch of files may repeat the names of earlier ones."""
    if not prefix:
        return table
    ids = pc.binary_join_element_wise(prefix, table.column("image_id"), "")
    return table.set_column(table.schema.get_field_index("image_id"), "image_id", ids)


def dataset_table(dataset: Dataset) -> pa.Table:
    """The manifest rows of a dataset split as an Arrow table."""
    records = dataset.records
    return pa.table(
        {
            "image_id": pa.array([r.image_id for r in records], pa.string()),
            "uri": pa.array([r.uri for r in records], pa.string()),
            "width": pa.array([r.width for r in records], pa.int32()),
            "height": pa.array([r.height for r in records], pa.int32()),
        }
    )


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
    uris = [u for u in storage.list_files(folder, pattern=pattern) if u.lower().endswith(IMAGE_SUFFIXES)]
    return rows_from_uris(folder, uris, skipped=skipped, on_image=on_image)


def rows_from_uris(
    folder: str, uris: Sequence[str], *, skipped: list[str] | None = None, on_image: Callable[[], None] | None = None
) -> Iterator[Row]:
    """Manifest rows of image files under ``folder`` (see :func:`rows_from_images`)."""
    base = str(folder).rstrip("/")
    for uri in uris:
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


MARKER = "_MANIFEST.json"  # written last: a folder without it holds a partial manifest


def write_marker(folder: str, shards: list[str], rows: int, **extra) -> None:
    """Commit a manifest folder: its shards (names relative to it) and row count, written last."""
    names = [uri.rsplit("/", 1)[-1] for uri in shards]
    storage.write_json(storage.join(folder, MARKER), {"rows": rows, "shards": names, **extra})


def unfinished_build(folder: str) -> str:
    """Why a manifest folder without its marker is refused, and the fix in both cases (``run``, ``pool add``:
    the same words): a ``pool build`` that did not finish, or Parquet shards a team's own job wrote."""
    return (
        f"{folder} has manifest-*.parquet shards but no {MARKER}, so it is not a sealed pool manifest. If "
        "`almdn-ray pool build` wrote them, it did not finish: run the same command again (it resumes). If your "
        f"own job wrote them, they are a listing: `almdn-ray pool build {folder} OUT` makes a manifest of them "
        "(see `pool build --help` for the column options), then give OUT"
    )


def read_marker(folder: str) -> dict | None:
    uri = storage.join(folder, MARKER)
    return storage.read_json(uri) if storage.exists(uri) else None


def is_manifest(folder: str) -> bool:
    """Whether ``folder`` is a pool manifest (``pool build`` output): its marker, or at least a shard."""
    if str(folder).lower().endswith((".json", ".zip")):
        return False
    if storage.exists(storage.join(folder, MARKER)):
        return True
    try:
        return bool(storage.list_files(folder, pattern="manifest-*.parquet"))
    except (FileNotFoundError, OSError):
        return False


def _shard_name(index: int, prefix: str = "manifest") -> str:
    return f"{prefix}-{index:05d}.parquet"


def write_manifest_table(
    table: pa.Table, out: str, *, rows_per_shard: int = 100_000, first_shard: int = 0, marker: bool = True, **extra
) -> list[str]:
    """Write an Arrow table of manifest rows as shards, then (``marker``) the marker that commits them.

    Columns are cast to :data:`MANIFEST_SCHEMA`; ids must be unique (checked in Arrow, without Python rows).
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    if table.num_rows == 0:
        raise ValueError(f"no images for the pool manifest at {out}; check the source folder, pattern or split")
    check_unique_ids(table.column("image_id"), out)
    shards = []
    for n, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        uri = storage.join(out, _shard_name(first_shard + n))
        storage.write_parquet(uri, table.slice(start, rows_per_shard))
        shards.append(uri)
    if marker:
        write_marker(out, shards, table.num_rows, **extra)
    logger.info("wrote %d manifest rows in %d shard(s) to %s", table.num_rows, len(shards), out)
    return shards


def check_unique_ids(ids: pa.ChunkedArray | pa.Array, where: str) -> None:
    """Raise ``ValueError`` naming null or empty image ids (by row) and repeated ones (Arrow: no per-row Python
    objects)."""
    missing = pc.fill_null(pc.equal(pc.utf8_length(ids), 0), True)  # null ids: null lengths
    if pc.any(missing).as_py():
        rows = pc.indices_nonzero(missing).to_pylist()
        raise ValueError(
            f"{where}: {len(rows)} row(s) have no image_id (null or empty): {shortened(rows, 10)}; give every "
            "image an id"
        )
    if pc.count_distinct(ids).as_py() == len(ids):  # the common case, without a table of counts
        return
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise ValueError(
            f"{where}: {len(repeated)} duplicate image id(s): {shortened(repeated.to_pylist(), 10)}; image ids must be "
            "unique in a pool"
        )


def write_manifest(rows: Iterable[Row], out: str, *, rows_per_shard: int = 10_000) -> list[str]:
    """Write rows as ``out/manifest-00000.parquet`` … shards of at most ``rows_per_shard`` rows, then the
    marker.

    Returns:
        The shard URIs. Raises ``ValueError`` on a duplicate image id or an empty pool.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    seen: set[str] = set()
    shards: list[str] = []
    batch: list[Row] = []

    def flush() -> None:
        table = rows_table(batch)
        uri = storage.join(out, _shard_name(len(shards)))
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
    write_marker(out, shards, len(seen))
    logger.info("wrote %d manifest rows in %d shard(s) to %s", len(seen), len(shards), out)
    return shards


def manifest_shards(folder: str) -> list[str]:
    """The shards of a manifest: those its marker lists (strays of an interrupted write are not read), or
    every ``manifest-*.parquet`` of a folder without a marker."""
    marker = read_marker(folder)
    if marker is not None:
        return [storage.join(folder, name) for name in marker["shards"]]
    return storage.list_files(folder, pattern="manifest-*.parquet")


def read_manifest(folder: str, *, ids: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """All shards of a manifest folder as one table, in shard order (only the rows of ``ids`` when given).

    A folder without its marker (an unfinished ``pool build``) is refused; one with a marker must hold exactly
    the rows it counts: a changed pool is an error, not a silently smaller or larger one.
    """
    shards = manifest_shards(folder)
    if not shards:
        raise FileNotFoundError(f"{folder} has no manifest-*.parquet shards; build them with `almdn-ray pool build`")
    marker = read_marker(folder)
    if marker is None:
        raise ValueError(unfinished_build(folder))
    names = list(columns) if columns is not None else MANIFEST_SCHEMA.names
    schema = pa.schema([MANIFEST_SCHEMA.field(n) for n in names])
    wanted = pa.array(list(ids), pa.string()) if ids is not None else None
    tables, rows = [], 0
    for uri in shards:
        try:
            table = storage.read_parquet(uri, columns=names if wanted is None else sorted({*names, "image_id"}))
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{uri}: a shard of the manifest {folder} is missing") from error
        rows += table.num_rows
        if wanted is not None:
            table = table.filter(pc.is_in(table.column("image_id"), wanted))
        tables.append(table.select(names).cast(schema))
    if rows != marker["rows"]:
        raise ValueError(
            f"{folder}: the shards hold {rows} rows but the manifest's marker ({MARKER}) says {marker['rows']}; "
            "the manifest was changed after it was written: rebuild it"
        )
    return pa.concat_tables(tables)


def manifest_rows(folder: str) -> int:
    """Row count of a committed manifest (its marker), without reading the shards."""
    marker = read_marker(folder)
    if marker is None:
        raise FileNotFoundError(f"{folder}: no {MARKER}; the manifest is incomplete")
    return int(marker["rows"])


# ---- building from a folder of images, resumably and in parallel ----------------------------------------------
PLAN = "_LISTING.parquet"  # the sorted file list of a build, written first: a resumed build cuts the same chunks


def plan_image_build(folder: str, out: str, *, pattern: str = "*", id_prefix: str = "") -> list[str]:
    """The image files a ``pool build`` of ``folder`` reads, listed once and kept in ``out`` (with the build's
    ``id_prefix``) so that a resumed build (even after files were added) writes the same shards."""
    plan_uri = storage.join(out, PLAN)
    if storage.exists(plan_uri):
        plan = storage.read_parquet(plan_uri)
        started = (plan.schema.metadata or {}).get(b"id_prefix", b"").decode()
        if started != id_prefix:
            raise ValueError(
                f"{out}: this build was started with --id-prefix {started!r}; give the same to resume it (or delete "
                f"{out} to build it anew)"
            )
        return plan.column("uri").to_pylist()
    uris = [u for u in storage.list_files(folder, pattern=pattern) if u.lower().endswith(IMAGE_SUFFIXES)]
    if not uris:
        raise ValueError(f"no images under {folder} match {pattern!r}; check the folder and --pattern")
    plan = pa.table({"uri": pa.array(uris, pa.string())}).replace_schema_metadata({"id_prefix": id_prefix})
    storage.write_parquet(plan_uri, plan)
    return uris


def build_image_shard(folder: str, uris: Sequence[str], shard_uri: str, id_prefix: str = "") -> list[str]:
    """Read the headers of ``uris`` (files under ``folder``) into one manifest shard, ids after ``id_prefix``;
    returns what was skipped."""
    skipped: list[str] = []
    rows = list(rows_from_uris(folder, uris, skipped=skipped))
    storage.write_parquet(shard_uri, prefix_ids(rows_table(rows), id_prefix))
    return skipped


def build_image_manifest(
    folder: str,
    out: str,
    *,
    pattern: str = "*",
    rows_per_shard: int = 10_000,
    map_chunks: Callable[[Callable, list], Iterable] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    id_prefix: str = "",
) -> tuple[list[str], list[str]]:
    """``pool build`` of an image folder: one shard per chunk of files, chunks already written are kept (a
    resumed build reads only the rest), the marker last.

    Args:
        map_chunks: ``map_chunks(function, args)`` runs ``function(*a)`` for each chunk's ``a`` and yields the
            results in order (the CLI passes Ray tasks for a large pool); default: one after another here.
        on_chunk: called with the number of files of each finished chunk.
        id_prefix: put before every image id (a resumed build must give the same).

    Returns:
        The shard URIs and the files skipped (unreadable headers).
    """
    if read_marker(out) is not None:
        marker = read_marker(out)
        return [storage.join(out, n) for n in marker["shards"]], list(marker.get("skipped", []))
    uris = plan_image_build(folder, out, pattern=pattern, id_prefix=id_prefix)
    chunks = [uris[i : i + rows_per_shard] for i in range(0, len(uris), rows_per_shard)]
    shard_uris = [storage.join(out, _shard_name(n)) for n in range(len(chunks))]
    todo = [(folder, chunk, uri, id_prefix) for chunk, uri in zip(chunks, shard_uris) if not storage.exists(uri)]
    if len(todo) < len(chunks):
        logger.info("%s: %d of %d shards already written; reading the rest", out, len(chunks) - len(todo), len(chunks))
    skipped: list[str] = []
    mapper = map_chunks or (lambda function, args: (function(*a) for a in args))
    for args, result in zip(todo, mapper(build_image_shard, todo)):
        skipped += result
        if on_chunk is not None:
            on_chunk(len(args[1]))
    ids = pa.concat_arrays(
        [storage.read_parquet(uri, columns=["image_id"]).column("image_id").combine_chunks() for uri in shard_uris]
    )
    check_unique_ids(ids, out)
    if len(ids) == 0:
        raise ValueError(f"no readable images under {folder}; every file was skipped")
    write_marker(out, shard_uris, len(ids), skipped=skipped[:1000])
    return shard_uris, skipped
