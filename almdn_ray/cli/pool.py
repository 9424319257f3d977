"""`almdn-ray pool`: build a manifest, add images to a run's pool, list near-duplicates."""

from __future__ import annotations

from pathlib import Path

import typer

from almdn_ray.cli.common import ENDPOINT, fail, job_of, pool_app, progress, use_endpoint

RAY_BUILD_FROM_FILES = 50_000  # `pool build` of a folder with more files than this reads headers in Ray tasks
ID_PREFIX = "Put this before every image id (e.g. week2/), so that file names may repeat those already in a pool."


@pool_app.command("build")
def pool_build(
    source: str = typer.Argument(..., help="COCO JSON, VOC devkit folder, or a folder of images (local or s3://)."),
    out: str = typer.Argument(..., help="Folder for manifest-NNNNN.parquet shards (local or s3://)."),
    split: str = typer.Option(None, help="VOC split (default trainval)."),
    pattern: str = typer.Option("*", help="Image folder: glob of file names to include, e.g. '*.jpg'."),
    rows_per_shard: int = typer.Option(10_000, min=1, help="Rows per Parquet shard."),
    image_root: str = typer.Option(None, help="COCO: folder the file_names are relative to."),
    use_ray: bool = typer.Option(
        None, "--ray/--no-ray", help=f"Read image headers in Ray tasks (default: above {RAY_BUILD_FROM_FILES} files)."
    ),
    id_prefix: str = typer.Option("", "--id-prefix", help=ID_PREFIX),
) -> None:
    """Write the pool manifest (image_id, uri, width, height) as Parquet shards, then its marker.

    An image folder is listed once and read in chunks, one shard each: an interrupted build run again
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
        if detect_format(source) == "images":

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
                    rows_per_shard=rows_per_shard,
                    map_chunks=map_chunks,
                    on_chunk=lambda n: [advance() for _ in range(n)],
                    id_prefix=id_prefix,
                )
        else:
            table = dataset_table(read_dataset(source, split=split, image_root=image_root))
            shards = write_manifest_table(prefix_ids(table, id_prefix), out, rows_per_shard=rows_per_shard)
    except (DatasetError, FileNotFoundError, ValueError, OSError) as error:
        raise fail(str(error)) from error
    for line in skipped:
        typer.secho(f"skipped: {line}", fg=typer.colors.YELLOW)
    typer.echo(f"wrote {len(shards)} shard(s) to {out}")


@pool_app.command("add")
def pool_add(
    run_uri: str = typer.Argument(..., help="The run's storage URI."),
    source: str = typer.Argument(..., help="New images: a manifest folder, a folder of images, or a COCO/VOC split."),
    split: str = typer.Option(None, help="VOC split (default trainval)."),
    pattern: str = typer.Option("*", help="Image folder: glob of file names to include."),
    image_root: str = typer.Option(None, help="COCO: folder the file_names are relative to."),
    id_prefix: str = typer.Option("", "--id-prefix", help=ID_PREFIX),
    endpoint: str = ENDPOINT,
) -> None:
    """Append new images to a run's pool between cycles; the next SCORE stage scores them."""
    from almdn_ray.data.manifest import dataset_table, is_manifest, read_manifest, rows_from_images, rows_table
    from almdn_ray.data.records import DatasetError
    from almdn_ray.data.validate import detect_format, read_dataset
    from almdn_ray.pool_growth import PoolAddError, add_to_pool
    from almdn_ray.state import LeaseError

    use_endpoint(endpoint)
    try:
        job = job_of(run_uri)
        if is_manifest(source):
            table = read_manifest(source)
        elif detect_format(source) == "images":
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
