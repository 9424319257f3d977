"""`almdn-ray pool`: build a manifest, add images to a run's pool, list near-duplicates."""

from __future__ import annotations

from pathlib import Path

import typer

from almdn_ray.cli.common import ENDPOINT, fail, job_of, pool_app, progress, use_endpoint

RAY_BUILD_FROM_FILES = 50_000  # `pool build` of a folder with more files than this reads headers in Ray tasks
ID_PREFIX = "Put this before every image id (e.g. week2/), so that file names may repeat those already in a pool."
URI_COLUMN = typer.Option(
    None, "--uri-column", help="Listing: the URI column (default 'uri'; 'key' when --uri-prefix is given)."
)
URI_PREFIX = typer.Option(
    "", "--uri-prefix", help="Listing: put before every URI value, e.g. s3://bucket/ for a column of keys."
)
ID_COLUMN = typer.Option(
    None, "--id-column", help="Listing: the image id column (default 'image_id' if any, else from the URI)."
)
WIDTH_COLUMN = typer.Option(None, "--width-column", help="Listing: image widths (default 'width' if any).")
HEIGHT_COLUMN = typer.Option(None, "--height-column", help="Listing: image heights (default 'height' if any).")


@pool_app.command("build")
def pool_build(
    source: str = typer.Argument(
        ...,
        help="A listing of image URIs (.parquet, .csv or .jsonl file, or a folder of them), a COCO JSON, a VOC "
        "devkit folder, or a folder of images (local or s3://).",
    ),
    out: str = typer.Argument(..., help="Folder for manifest-NNNNN.parquet shards (local or s3://)."),
    uri_column: str = URI_COLUMN,
    uri_prefix: str = URI_PREFIX,
    id_column: str = ID_COLUMN,
    width_column: str = WIDTH_COLUMN,
    height_column: str = HEIGHT_COLUMN,
    split: str = typer.Option(None, help="VOC split (default trainval)."),
    pattern: str = typer.Option("*", help="Image folder: glob of file names to include, e.g. '*.jpg'."),
    rows_per_shard: int = typer.Option(
        None, min=1, help="Rows per Parquet shard (default 100,000 for a listing, else 10,000)."
    ),
    image_root: str = typer.Option(None, help="COCO: folder the file_names are relative to."),
    use_ray: bool = typer.Option(
        None, "--ray/--no-ray", help=f"Read image headers in Ray tasks (default: above {RAY_BUILD_FROM_FILES} files)."
    ),
    id_prefix: str = typer.Option("", "--id-prefix", help=ID_PREFIX),
) -> None:
    """Write the pool manifest (image_id, uri, width, height) as Parquet shards, then its marker.

    A listing (a team's table of object keys) is read in Arrow and checked whole before anything is written:
    empty or non-absolute URIs, unknown schemes, repeated ids or URIs are errors naming the rows. Sizes the
    listing lacks stay empty; the stages read them from the images they decode. An image folder is listed
    once and read in chunks, one shard each: an interrupted build run again
    reads only the chunks not written yet. The marker (_MANIFEST.json) is written last; a run refuses a
    manifest without it.
    """
    from almdn_ray.data.manifest import (
        build_image_manifest,
        dataset_table,
        prefix_ids,
        read_marker,
        write_manifest_table,
    )
    from almdn_ray.data.records import DatasetError
    from almdn_ray.data.validate import detect_format, read_dataset

    skipped: list[str] = []
    try:
        if read_marker(out) is not None:
            raise fail(f"{out} already holds a complete manifest; give another folder (or delete it to rebuild)")
        kind = detect_format(source)
        if kind == "listing":
            from almdn_ray.data.listing import ListingColumns, build_listing_manifest

            columns = ListingColumns(uri_column, uri_prefix, id_column, width_column, height_column)
            with progress("reading the listing", None) as advance:
                shards = build_listing_manifest(
                    source,
                    out,
                    columns,
                    rows_per_shard=rows_per_shard or 100_000,
                    id_prefix=id_prefix,
                    on_rows=lambda n: advance(),
                )
        elif kind == "images":

            def map_chunks(function, args):
                files = sum(len(a[1]) for a in args)
                if use_ray or (use_ray is None and files > RAY_BUILD_FROM_FILES):
                    from almdn_ray.distributed.pool_build import ray_map_chunks

                    return ray_map_chunks(function, args)
                return (function(*a) for a in args)

            with progress("reading image headers", None) as advance:
                shards, skipped = build_image_manifest(
                    source,
                    out,
                    pattern=pattern,
                    rows_per_shard=rows_per_shard or 10_000,
                    map_chunks=map_chunks,
                    on_chunk=lambda n: [advance() for _ in range(n)],
                    id_prefix=id_prefix,
                )
        else:
            table = dataset_table(read_dataset(source, split=split, image_root=image_root))
            shards = write_manifest_table(prefix_ids(table, id_prefix), out, rows_per_shard=rows_per_shard or 10_000)
    except (DatasetError, FileNotFoundError, ValueError, OSError) as error:
        raise fail(str(error)) from error
    for line in skipped:
        typer.secho(f"skipped: {line}", fg=typer.colors.YELLOW)
    typer.echo(f"wrote {len(shards)} shard(s) to {out}")


@pool_app.command("add")
def pool_add(
    run_uri: str = typer.Argument(..., help="The run's storage URI."),
    source: str = typer.Argument(
        ..., help="New images: a manifest folder, a listing (as `pool build`), a folder of images, or a COCO/VOC split."
    ),
    uri_column: str = URI_COLUMN,
    uri_prefix: str = URI_PREFIX,
    id_column: str = ID_COLUMN,
    width_column: str = WIDTH_COLUMN,
    height_column: str = HEIGHT_COLUMN,
    split: str = typer.Option(None, help="VOC split (default trainval)."),
    pattern: str = typer.Option("*", help="Image folder: glob of file names to include."),
    image_root: str = typer.Option(None, help="COCO: folder the file_names are relative to."),
    id_prefix: str = typer.Option("", "--id-prefix", help=ID_PREFIX),
    endpoint: str = ENDPOINT,
) -> None:
    """Append new images to a run's pool between cycles; the next SCORE stage scores them."""
    from almdn_ray.data.manifest import (
        dataset_table,
        is_manifest,
        read_manifest,
        rows_from_images,
        rows_table,
    )
    from almdn_ray.data.records import DatasetError
    from almdn_ray.data.validate import detect_format, read_dataset
    from almdn_ray.pool_growth import PoolAddError, add_to_pool
    from almdn_ray.state import LeaseError

    use_endpoint(endpoint)
    try:
        job = job_of(run_uri)
        if is_manifest(source):  # shards without their marker are refused: a partial build, or a team's (say which)
            table = read_manifest(source)
        elif (kind := detect_format(source)) == "listing":
            from almdn_ray.data.listing import ListingColumns, read_listing

            table = read_listing(source, ListingColumns(uri_column, uri_prefix, id_column, width_column, height_column))
        elif kind == "images":
            table = rows_table(list(rows_from_images(source, pattern=pattern)))
        else:
            table = dataset_table(read_dataset(source, split=split, image_root=image_root))
        added = add_to_pool(run_uri, job, table, source, id_prefix=id_prefix)
    except (PoolAddError, LeaseError, DatasetError, FileNotFoundError, ValueError, OSError) as error:
        raise fail(str(error)) from error
    typer.echo(f"added {added['rows']} images to the pool (now {added['pool']}); the next SCORE stage scores them")


@pool_app.command("duplicates")
def pool_duplicates(
    run_uri: str = typer.Argument(..., help="The run's storage URI."),
    cycle: int = typer.Option(None, "--cycle", help="Whose score files to read (default: the latest scored)."),
    max_distance: float = typer.Option(
        0.05, "--max-distance", help="Embedding distance (unit rows: 0-2) within which two images are duplicates."
    ),
    out: Path = typer.Option(None, "--out", help="Also write every group to this JSON file."),
    show: int = typer.Option(20, "--show", help="How many groups to print."),
    endpoint: str = ENDPOINT,
) -> None:
    """List groups of near-duplicate pool images (from the scoring pass's embeddings) so the pool can be cleaned."""
    import json

    from rich.console import Console
    from rich.table import Table

    from almdn_ray.report import pool_duplicates as find

    use_endpoint(endpoint)
    try:
        found = find(run_uri, cycle=cycle, max_distance=max_distance)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise fail(str(error)) from error
    groups = found["groups"]
    copies = sum(len(g) - 1 for g in groups)
    typer.echo(
        f"cycle {found['cycle']}: {len(groups)} groups of near-duplicates among {found['images']} scored images "
        f"(distance <= {max_distance}); keeping one per group would drop {copies} images"
    )
    if groups:
        table = Table("group", "images", "image ids (first 5)", "first uri")
        for n, group in enumerate(groups[:show]):
            table.add_row(str(n), str(len(group)), ", ".join(r["image_id"] for r in group[:5]), str(group[0]["uri"]))
        Console(width=160).print(table)
    if out is not None:
        out.write_text(json.dumps(found, indent=1))
        typer.echo(f"groups written to {out}")
