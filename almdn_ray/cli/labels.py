"""`almdn-ray labels`: export the selection for a labelling tool, import its labels."""

from __future__ import annotations

import typer

from almdn_ray.cli.common import ENDPOINT, fail, labels_app, pool_image_root, progress, run_of, use_endpoint


@labels_app.command("export")
def labels_export(
    run_uri: str = typer.Argument(..., help="The run's storage URI."),
    fmt: str = typer.Option("coco", "--format", help="coco | labelstudio | cvat (see the README's tool table)."),
    image_root: str = typer.Option(
        None, help="Write file names relative to this folder (default: the pool's image root; others stay URIs)."
    ),
    url_prefix: str = typer.Option(
        None, help="Label Studio: data.image = PREFIX + file name (default: s3:// URIs, or /data/local-files/?d=)."
    ),
    predictions: bool = typer.Option(True, help="labelstudio/cvat: the cycle's model's detections as pre-annotations."),
    min_score: float = typer.Option(0.5, min=0.0, max=1.0, help="Lowest confidence of a pre-annotation."),
    endpoint: str = ENDPOINT,
) -> None:
    """Write the images to label in a labelling tool's format, and a CSV of image URIs."""
    from almdn_ray.labels import EXPORT_FORMATS, LabelImportError, awaiting, export_labels, predict_selection
    from almdn_ray.layout import model_spec

    use_endpoint(endpoint)
    if fmt not in EXPORT_FORMATS:
        raise fail(f"--format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    try:
        job, pool = run_of(run_uri)
        detections = None
        cold = awaiting(run_uri).cold
        if cold and predictions and fmt != "coco":
            typer.echo("no model yet (the initial set of a pool without labels): no pre-annotations")
        elif predictions and fmt != "coco":
            with progress("pre-annotating", None) as advance:
                detections = predict_selection(
                    run_uri, pool, model_spec(job, pool.num_classes), min_score=min_score, on_batch=lambda n: advance()
                )
        root = image_root if image_root is not None else pool_image_root(job)
        paths = export_labels(run_uri, pool, fmt=fmt, image_root=root, url_prefix=url_prefix, predictions=detections)
    except (LabelImportError, FileNotFoundError, OSError, ValueError) as error:
        raise fail(str(error)) from error
    typer.echo(f"{fmt} labels file: {paths['labels']}\nimage list: {paths['csv']}")
    if "config" in paths:
        typer.echo(f"Label Studio labelling config: {paths['config']}")
    if detections is not None:
        typer.echo(f"pre-annotations: {sum(len(v) for v in detections.values())} detections >= {min_score}")
    if root:
        typer.echo(f"file names are relative to {root}")


@labels_app.command("import")
def labels_import(
    run_uri: str = typer.Argument(...),
    labels_file: str = typer.Argument(
        ..., help="A tool's export: COCO JSON, Label Studio JSON tasks, or a Pascal VOC folder or .zip."
    ),
    endpoint: str = ENDPOINT,
) -> None:
    """Check and store the labels of the selected images; the next `run` continues with them."""
    from almdn_ray.labels import LabelImportError, import_labels

    use_endpoint(endpoint)
    try:
        _, pool = run_of(run_uri)
        summary = import_labels(run_uri, labels_file, pool)
    except (LabelImportError, FileNotFoundError, OSError) as error:
        raise fail(str(error)) from error
    for kind, count in sorted(summary.problems.counts.items()):
        typer.secho(f"warning: {count} {kind}", fg=typer.colors.YELLOW)
        for line in summary.problems.examples(kind, 3):
            typer.echo(f"  {line}")
    typer.echo(
        f"imported {summary.boxes} boxes on {summary.images} images ({summary.format}); "
        "continue with `almdn-ray run JOB.yaml`"
    )
