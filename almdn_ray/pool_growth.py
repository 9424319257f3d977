"""Growing a run's pool between cycles (``almdn-ray pool add``): teams receive new images every week."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from almdn_ray import storage
from almdn_ray.data.manifest import (
    MANIFEST_SCHEMA,
    check_unique_ids,
    manifest_shards,
    prefix_ids,
    read_manifest,
    read_marker,
    write_manifest_table,
    write_marker,
)
from almdn_ray.layout import RunLayout
from almdn_ray.state import Lease, load_state, save_state

logger = logging.getLogger(__name__)

__all__ = ["PoolAddError", "add_to_pool"]

ADD_ROWS_PER_SHARD = 1_000_000


class PoolAddError(ValueError):
    """Images that cannot be added; the pool is unchanged."""


def _named(ids: pa.Array, limit: int = 20) -> str:
    shown = ids.slice(0, limit).to_pylist()
    return f"{shown}" + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _uri_problems(table: pa.Table, present: pa.Table, known: pa.ChunkedArray, source: str) -> list[str]:
    """The same image twice: URIs repeated in ``table``, or already in the pool (``present``) under another id
    (rows whose id is ``known`` in the pool are named by id already)."""
    problems = []
    counts = pc.value_counts(table.column("uri"))
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        problems.append(f"{len(repeated)} URI(s) appear more than once in {source}: {_named(repeated)}")
    uris = table.column("uri")
    clash = pc.and_(pc.is_in(uris, present.column("uri")), pc.invert(known))
    if pc.any(clash).as_py():
        clashing = pc.filter(uris, clash)
        ids = pc.take(present.column("image_id"), pc.index_in(clashing, present.column("uri")))
        shown = [f"{u!r} (as {i!r})" for u, i in zip(clashing.slice(0, 20).to_pylist(), ids.to_pylist())]
        more = f" and {len(clashing) - 20} more" if len(clashing) > 20 else ""
        problems.append(
            f"{len(clashing)} image(s) are already in the pool under another id: [{', '.join(shown)}]{more} "
            "(leave them out of the source)"
        )
    return problems


def add_to_pool(run: str, job, table: pa.Table, source: str, *, id_prefix: str = "") -> dict:
    """Append ``table``'s manifest rows (their ids after ``id_prefix``) to the run's frozen pool, committed by its
    marker (all or nothing).

    Refused, naming the ids: images already labelled (or selected for labelling), ids already in the pool,
    images (URIs) already in the pool under another id, ids or URIs repeated in ``table``, null or empty ids.
    Only between cycles' drivers (the run's lease is taken) and in human mode (a simulation run's labels come
    from its dataset, which does not have the new images).

    Returns:
        ``{"rows": added, "pool": rows now}``.
    """
    layout = RunLayout(run)
    if job.labels.mode != "human":
        raise PoolAddError(
            f"{run}: labels.mode is {job.labels.mode}: its labels come from dataset.train, which lacks new images; "
            "pool add is for human-labelled runs"
        )
    lease = Lease(run)
    lease.acquire()
    try:
        state = load_state(run)
        marker = read_marker(layout.pool)
        if state is None or marker is None:
            raise PoolAddError(f"{run}: the run has no frozen pool yet; start it with `almdn-ray run` first")
        if state.status == "finished":
            raise PoolAddError(f"{run}: the run is finished; start a new run with the grown pool")
        table = prefix_ids(table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA), id_prefix)
        if table.num_rows == 0:
            raise PoolAddError(f"{source}: no images to add")
        try:
            check_unique_ids(table.column("image_id"), source)
        except ValueError as error:
            raise PoolAddError(str(error)) from error
        new_ids = table.column("image_id")
        labelled = []
        for k in range(state.cycle + 1):
            for name in ("labeled.parquet", "selected.parquet"):
                if storage.exists(layout.cycle(k, name)):
                    labelled += storage.read_parquet(layout.cycle(k, name)).column("image_id").to_pylist()
        labelled = pa.array(sorted(set(labelled)), pa.string())
        problems = []
        taken = pc.filter(new_ids, pc.is_in(new_ids, labelled))
        if len(taken):
            problems.append(f"{len(taken)} image id(s) are already labelled or selected for labelling: {_named(taken)}")
        present = read_manifest(layout.pool, columns=["image_id", "uri"])
        known = pc.is_in(new_ids, present.column("image_id"))
        again = pc.filter(new_ids, pc.and_(known, pc.invert(pc.is_in(new_ids, labelled))))
        if len(again):
            problems.append(
                f"{len(again)} image id(s) are already in the pool: {_named(again)} (new images whose file names "
                "repeat earlier ones: add them with --id-prefix, e.g. --id-prefix week2/)"
            )
        problems += _uri_problems(table, present, known, source)
        if problems:
            raise PoolAddError(f"{source}: nothing added:\n  " + "\n  ".join(problems))
        lease.check()
        kept = set(marker["shards"])
        for stray in storage.list_files(layout.pool, pattern="manifest-*.parquet"):
            if stray.rsplit("/", 1)[-1] not in kept:  # an interrupted earlier add: never committed
                storage.delete(stray)
        shards = manifest_shards(layout.pool)
        added = write_manifest_table(
            table, layout.pool, rows_per_shard=ADD_ROWS_PER_SHARD, first_shard=len(shards), marker=False
        )
        when = datetime.now(UTC).isoformat(timespec="seconds")
        entry = {"source": source, "rows": table.num_rows, "cycle": state.cycle, "added_at": when}
        if id_prefix:
            entry["id_prefix"] = id_prefix
        rows = int(marker["rows"]) + table.num_rows
        extra = {k: v for k, v in marker.items() if k not in ("rows", "shards", "additions")}
        lease.check()  # the commit
        write_marker(layout.pool, shards + added, rows, **extra, additions=[*marker.get("additions", []), entry])
        state.history.append({"cycle": state.cycle, "stage": "pool add", "seconds": 0.0, "finished_at": when,
                              "rows": table.num_rows, "source": source})  # fmt: skip
        save_state(run, state, lease)
        logger.info("%s: added %d images from %s (pool: %d)", run, table.num_rows, source, rows)
        return {"rows": table.num_rows, "pool": rows}
    finally:
        lease.release()
