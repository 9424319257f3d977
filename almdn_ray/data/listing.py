"""A team's listing of images (Parquet from a data lake, CSV or JSON lines) made into a pool manifest.

A listing is what a team already has for ten million images: one row per object key, in its own column names,
usually without image sizes. :func:`read_listing` turns it into manifest rows in Arrow, file by file and batch
by batch (no Python object per row): the URI (a column, or a key column after a prefix), the id (a column, or
derived from the URI: stable, the same URI always gives the same id) and the sizes when the listing has them;
rows without sizes keep them empty, and the stages that need them read them from the image (see
:meth:`almdn_ray.data.pool.Pool.rows`). Every problem of the listing is found before anything is written:
empty URIs, URIs that are not absolute or name a store we cannot read, missing columns, repeated ids or URIs,
each named by file and row with a count. :func:`build_listing_manifest` then writes the shards and seals them
with the marker, resumably.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from almdn_ray import storage
from almdn_ray.data.manifest import MANIFEST_SCHEMA, PLAN, _shard_name, prefix_ids, read_marker, write_marker

logger = logging.getLogger(__name__)

__all__ = [
    "LISTING_SUFFIXES", "ListingColumns", "ListingError", "suffix_kind", "listing_files", "listing_kind",
    "read_listing", "build_listing_manifest", "derived_ids",
]  # fmt: skip

LISTING_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json"}
BUILD = "_BUILD.json"  # what a listing build was started with, written first: a resumed build must match it
SHOWN = 10  # rows named per kind of problem; the rest are counted
_IMAGE_SUFFIX = r"(?i)\.(jpe?g|png|bmp|gif|webp|tiff?)$"


class ListingError(ValueError):
    """A listing that cannot become a manifest; the message names every problem by file and row."""


@dataclass(frozen=True)
class ListingColumns:
    """Which of a listing's columns hold what.

    Attributes:
        uri: the image URI column (default ``uri``; else ``key`` when ``uri_prefix`` is given).
        uri_prefix: put before every value of ``uri`` (``s3://bucket/`` for a column of object keys).
        image_id: the id column (default: ``image_id`` when the listing has one, else derived from the URI, see
            :func:`derived_ids`).
        width, height: size columns (default: ``width`` and ``height`` when the listing has both, else the
            sizes are left empty).
    """

    uri: str | None = None
    uri_prefix: str = ""
    image_id: str | None = None
    width: str | None = None
    height: str | None = None


def suffix_kind(name: str) -> str | None:
    """The listing kind a file's name says (``.csv.gz`` included), else None."""
    lower = name.lower()
    if lower.endswith((".gz", ".bz2", ".zst")) and lower.rsplit(".", 2)[-2:-1] in (["csv"], ["jsonl"], ["ndjson"]):
        lower = lower.rsplit(".", 1)[0]  # pyarrow reads compressed CSV and JSON lines as they are
    return next((kind for suffix, kind in LISTING_SUFFIXES.items() if lower.endswith(suffix)), None)


def _ignored(name: str) -> bool:
    """Files beside a data lake's shards that are not data: ``_SUCCESS``, ``.crc``, our own ``_MANIFEST.json``,
    and anything under a ``_`` or ``.`` folder (Spark's ``_temporary/``, ``.spark-staging/``, ``_delta_log/``)."""
    parts = name.strip("/").split("/")
    return any(p.startswith(("_", ".")) for p in parts) or parts[-1].endswith(".crc")


def listing_files(path: str) -> tuple[str, list[str]] | None:
    """``(kind, files)`` when ``path`` is a listing: one ``.parquet`` / ``.csv`` / ``.jsonl`` file, or a folder
    whose data files are all of one such kind (Spark's ``_SUCCESS`` and ``.crc`` files aside); else None."""
    kind = suffix_kind(str(path))
    if kind is not None:
        return (kind, [str(path)]) if storage.exists(path) else None
    if _holds_images(path):  # decided from the top level: a folder of ten million images is not listed twice
        return None
    try:
        files = [f for f in storage.list_files(path) if not _ignored(f[len(str(path).rstrip("/")) :])]
    except OSError:
        return None
    kinds = {suffix_kind(f) for f in files}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop(), files
    return None


def _holds_images(path: str) -> bool:
    """Whether a folder has an image file or a file of no listing kind at its top level (one listing request)."""
    import pyarrow.fs as pafs

    try:
        fs, inner = storage.resolve(path)
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    except (FileNotFoundError, OSError):
        return False
    files = [i.path for i in infos if i.type == pafs.FileType.File]
    return any(suffix_kind(f) is None and not _ignored(posixpath.basename(f)) for f in files)


def listing_kind(path: str) -> str | None:
    """``"parquet"``, ``"csv"`` or ``"json"`` when ``path`` is a listing (see :func:`listing_files`), else None."""
    found = listing_files(path)
    return found[0] if found else None


def _format(kind: str, names: list[str] | None = None) -> ds.FileFormat:
    if kind == "parquet":
        return ds.ParquetFileFormat()
    if kind == "csv":
        import pyarrow.csv as pacsv

        # Ids and keys are text even when they look like numbers ("000123" must keep its zeros).
        types = {n: pa.string() for n in names or ()}
        return ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True))
    return ds.JsonFileFormat()


def derived_ids(uris: pa.Array, uri_prefix: str) -> pa.Array:
    """Image ids derived from URIs, stable (the same URI always gives the same id, whatever the listing's
    order): the URI after ``uri_prefix`` (else after its ``s3://`` / ``file://`` scheme), without an image
    suffix. ``s3://bucket/raw/cam-a/001.jpg`` with prefix ``s3://bucket/`` gives ``raw/cam-a/001``."""
    if uri_prefix:
        ids = pc.utf8_slice_codeunits(uris, len(uri_prefix))
    else:
        ids = pc.replace_substring_regex(uris, r"^(s3|file)://", "")
    return pc.replace_substring_regex(ids, _IMAGE_SUFFIX, "")


class _Problems:
    """Rows of one kind of problem: the first :data:`SHOWN` named (file and row), the rest counted."""

    def __init__(self) -> None:
        self.kinds: dict[str, tuple[list[str], list[int]]] = {}

    def add(self, kind: str, where: list[str], count: int) -> None:
        """``count`` rows (or values) of ``kind``, of which ``where`` names the first."""
        shown, total = self.kinds.setdefault(kind, ([], [0]))
        shown.extend(where[: SHOWN - len(shown)])
        total[0] += count

    def lines(self) -> list[str]:
        out = []
        for kind, (shown, (count,)) in self.kinds.items():
            more = f", … and {count - len(shown)} more" if count > len(shown) else ""
            out.append(f"{count} {kind}: {'; '.join(shown)}{more}")
        return out


def _add_rows(problems: _Problems, kind: str, name: str, rows: pa.Array, mask, values: pa.Array | None = None):
    """The rows of ``mask`` as problems of ``kind``: the first named (with their values), all counted."""
    hit = pc.filter(rows, mask)
    first = hit.slice(0, SHOWN).to_pylist()
    if values is None:
        where = [f"{name} row {r}" for r in first]
    else:
        where = [f"{name} row {r} ({v!r})" for r, v in zip(first, pc.filter(values, mask).slice(0, SHOWN).to_pylist())]
    problems.add(kind, where, len(hit))


def _choose_columns(source: str, names: list[str], columns: ListingColumns) -> ListingColumns:
    """The columns to read, checked against the listing's own; a missing one is an error naming them all."""
    have = ", ".join(names)
    uri = columns.uri
    if uri is None:
        uri = "uri" if "uri" in names or not columns.uri_prefix else "key"
    image_id = columns.image_id or ("image_id" if "image_id" in names else None)
    width, height = columns.width, columns.height
    if width is None and height is None and {"width", "height"} <= set(names):
        width, height = "width", "height"
    wanted = {"--uri-column": uri, "--id-column": columns.image_id}
    wanted |= {"--width-column": columns.width, "--height-column": columns.height}
    for option, name in wanted.items():
        if name is not None and name not in names:
            hint = " (a column of object keys: --uri-column key --uri-prefix s3://bucket/)" * (option == "--uri-column")
            raise ListingError(f"{source}: the listing has no column {name!r} for {option} (its columns: {have}){hint}")
    if (columns.width is None) != (columns.height is None):
        raise ListingError(f"{source}: give both --width-column and --height-column, or neither")
    return ListingColumns(uri, columns.uri_prefix, image_id, width, height)


def read_listing(
    source: str, columns: ListingColumns = ListingColumns(), *, on_rows: Callable[[int], None] | None = None
) -> pa.Table:
    """The manifest rows of a listing (:data:`MANIFEST_SCHEMA`; sizes null where the listing has none).

    Raises:
        ListingError: naming every problem (missing columns, empty or bad URIs, bad sizes, repeated ids or
            URIs) by file and row, with counts; nothing is written by this function in any case.
    """
    found = listing_files(source)
    if found is None:
        raise ListingError(
            f"{source} is not a listing: give a .parquet, .csv or .jsonl file, or a folder of one kind of them"
        )
    kind, files = found
    if files != [str(source)] and read_marker(source) is None:
        if storage.exists(storage.join(source, PLAN)) or storage.exists(storage.join(source, BUILD)):
            raise ListingError(
                f"{source} is an `almdn-ray pool build` that did not finish: run the same command again (it resumes)"
            )
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    try:
        probe = ds.dataset(paths[:1], format=_format(kind), filesystem=fs)
        chosen = _choose_columns(source, probe.schema.names, columns)
        text = [c for c in (chosen.uri, chosen.image_id) if c is not None]
        dataset = ds.dataset(paths, format=_format(kind, text), filesystem=fs)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ListingError(f"{source}: cannot be read as {kind}: {error}") from error
    wanted = [c for c in (chosen.uri, chosen.image_id, chosen.width, chosen.height) if c is not None]
    problems = _Problems()
    parts, places = [], []  # per batch: the manifest rows, and (file, first row) to name rows by
    for fragment, name in zip(dataset.get_fragments(), files):
        short = name[len(str(source).rstrip("/")) :].lstrip("/") or posixpath.basename(name)
        offset = 0
        try:
            batches = list(fragment.to_batches(columns=wanted, batch_size=1 << 20))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ListingError(f"{name}: cannot be read as {kind} with columns {wanted}: {error}") from error
        for batch in batches:
            part = _manifest_rows(batch, chosen, short, offset, problems)
            parts.append(part)
            places.append((short, offset))
            offset += batch.num_rows
            if on_rows is not None:
                on_rows(batch.num_rows)
    table = pa.concat_tables(parts) if parts else MANIFEST_SCHEMA.empty_table()
    if table.num_rows == 0 and not problems.kinds:
        raise ListingError(f"{source}: the listing has no rows")
    if not problems.kinds:
        id_fix = (
            "give the column of unique ids with --id-column"
            if chosen.image_id
            else "derived from the URIs: give --id-column"
        )
        ids_repeat = _repeats(table.column("image_id"), places, parts, f"repeated image ids ({id_fix})", problems)
        # Derived ids are a function of the URI: a repeated URI repeats its id, so unique ids mean unique URIs.
        if chosen.image_id is not None or ids_repeat:
            _repeats(table.column("uri"), places, parts, "repeated URIs (one image listed twice)", problems)
    if problems.kinds:
        lines = "\n  ".join(problems.lines())
        raise ListingError(f"{source}: the listing cannot become a pool manifest; nothing was written:\n  {lines}")
    return table


def _manifest_rows(batch: pa.RecordBatch, chosen: ListingColumns, name: str, offset: int, problems) -> pa.Table:
    """One batch of a listing as manifest rows; its problems are added to ``problems``."""
    rows = pa.array(range(offset + 1, offset + 1 + batch.num_rows), pa.int64())  # counted from 1, header aside
    raw = pc.cast(batch.column(chosen.uri), pa.string())
    empty = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(raw)), 0), True)
    if pc.any(empty).as_py():
        _add_rows(problems, "rows with an empty URI", name, rows, empty)
    uris = pc.binary_join_element_wise(chosen.uri_prefix, pc.fill_null(raw, ""), "") if chosen.uri_prefix else raw
    uris = pc.fill_null(uris, "")
    spaced = pc.and_(pc.not_equal(raw, pc.utf8_trim_whitespace(raw)), pc.invert(empty))
    if pc.any(pc.fill_null(spaced, False)).as_py():
        _add_rows(problems, "URIs with spaces before or after them (trim them)", name, rows, spaced, raw)
    good = pc.or_(
        pc.match_substring_regex(uris, r"^s3://[^/]+/.+$"),
        pc.match_substring_regex(uris, r"^(file://)?/[^/].*$"),
    )
    bad = pc.and_(pc.invert(good), pc.invert(empty))
    if pc.any(bad).as_py():
        kind = (
            "URIs that are not s3://bucket/key or an absolute local path (give --uri-prefix for keys or relative paths)"
        )
        _add_rows(problems, kind, name, rows, bad, uris)
    if chosen.image_id is not None:
        ids = pc.cast(batch.column(chosen.image_id), pa.string())
        no_id = pc.fill_null(pc.equal(pc.utf8_length(ids), 0), True)
        if pc.any(no_id).as_py():
            _add_rows(problems, f"rows with an empty {chosen.image_id!r}", name, rows, no_id)
    else:
        ids = derived_ids(uris, chosen.uri_prefix)
    sizes = []
    for column in (chosen.width, chosen.height):
        if column is None:
            sizes.append(pa.nulls(batch.num_rows, pa.int32()))
            continue
        try:
            values = pc.cast(batch.column(column), pa.int32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ListingError(f"{name}: column {column!r} is not whole numbers of pixels: {error}") from error
        small = pc.fill_null(pc.less(values, 1), False)
        if pc.any(small).as_py():
            _add_rows(problems, f"rows with {column!r} < 1", name, rows, small, values)
        sizes.append(values)
    return pa.Table.from_arrays([ids, uris, *sizes], schema=MANIFEST_SCHEMA)


def _repeats(values: pa.ChunkedArray, places, parts: list[pa.Table], what: str, problems: _Problems) -> bool:
    """Values that occur more than once, each named with the rows that hold it; whether there were any."""
    if pc.count_distinct(values).as_py() == len(values):
        return False
    lengths = [p.num_rows for p in parts]
    counts = pc.value_counts(values)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    shown = repeated.slice(0, SHOWN)
    positions = pc.indices_nonzero(pc.is_in(values, shown)).to_numpy()
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    where: dict[str, list[str]] = {}
    flat = values.take(pa.array(positions)).to_pylist()
    for position, value in zip(positions.tolist(), flat):
        batch = next(b for b in range(len(lengths)) if starts[b] <= position < starts[b + 1])
        name, first = places[batch]
        where.setdefault(value, []).append(f"{name} row {first + 1 + position - starts[batch]}")
    lines = [f"{value!r} in {', '.join(rows[:3])}" + (" …" if len(rows) > 3 else "") for value, rows in where.items()]
    problems.add(what, lines, count=len(repeated))  # counted by value, not by row
    return True


def build_listing_manifest(
    source: str,
    out: str,
    columns: ListingColumns = ListingColumns(),
    *,
    rows_per_shard: int = 100_000,
    id_prefix: str = "",
    on_rows: Callable[[int], None] | None = None,
) -> list[str]:
    """``pool build`` of a listing: read and check it whole (:func:`read_listing`), then write the shards
    (those of an interrupted build with the same listing and options are kept) and the marker last.

    Returns:
        The shard URIs.
    """
    marker = read_marker(out)
    if marker is not None:
        return [storage.join(out, n) for n in marker["shards"]]
    settings = {"source": str(source), **asdict(columns), "rows_per_shard": rows_per_shard, "id_prefix": id_prefix}
    table = prefix_ids(read_listing(source, columns, on_rows=on_rows), id_prefix)  # ids checked unique there
    build_uri = storage.join(out, BUILD)
    started = storage.read_json(build_uri) if storage.exists(build_uri) else None
    if started is not None and started != {**settings, "rows": table.num_rows}:
        raise ListingError(
            f"{out}: an unfinished build of another listing or other options is here ({started}); give the same "
            f"source and options to resume it, or another folder"
        )
    if started is None:
        storage.write_json(build_uri, {**settings, "rows": table.num_rows})
    shards = []
    for n, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        uri = storage.join(out, _shard_name(n))
        part = table.slice(start, rows_per_shard)
        if not (storage.exists(uri) and _same_rows(uri, part)):  # a listing changed since: its rows anew
            storage.write_parquet(uri, part)
        shards.append(uri)
    write_marker(out, shards, table.num_rows, listing=settings)
    logger.info(
        "wrote %d manifest rows from the listing %s in %d shard(s) to %s", table.num_rows, source, len(shards), out
    )
    return shards


def _same_rows(uri: str, part: pa.Table) -> bool:
    """Whether the shard at ``uri`` (an interrupted build's) holds exactly ``part``'s rows."""
    try:
        kept = storage.read_parquet(uri)
    except (OSError, pa.ArrowInvalid):
        return False
    return kept.num_rows == part.num_rows and kept.cast(MANIFEST_SCHEMA).equals(part.cast(MANIFEST_SCHEMA))
