"""`almdn-ray labels`: export the selection for a labelling tool, import its labels; push to and pull from
Label Studio through its API."""

from __future__ import annotations

from pathlib import Path

import typer

from almdn_ray.cli.common import ENDPOINT, fail, labels_app, pool_image_root, progress, run_of, use_endpoint


def pre_annotations(run_uri: str, job, pool, wanted: bool, min_score: float):
    """The cycle's model's detections on the images to label, or None (not wanted, or no model yet)."""
    from almdn_ray.labels import awaiting, predict_selection
    from almdn_ray.layout import model_spec

    if not wanted:
        return None
    if awaiting(run_uri).cold:
        typer.echo("no model yet (the initial set of a pool without labels): no pre-annotations")
        return None
    with progress("pre-annotating", None) as advance:
        return predict_selection(
            run_uri, pool, model_spec(job, pool.num_classes), min_score=min_score, on_batch=lambda n: advance()
        )


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
    from almdn_ray.labels import EXPORT_FORMATS, LabelImportError, export_labels

    use_endpoint(endpoint)
    if fmt not in EXPORT_FORMATS:
        raise fail(f"--format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    try:
        job, pool = run_of(run_uri)
        detections = pre_annotations(run_uri, job, pool, predictions and fmt != "coco", min_score)
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
    print_warnings(summary.problems)
    typer.echo(
        f"imported {summary.boxes} boxes on {summary.images} images ({summary.format}); "
        "continue with `almdn-ray run JOB.yaml`"
    )


def print_warnings(problems) -> None:
    for kind, count in sorted(problems.counts.items()):
        typer.secho(f"warning: {count} {kind}", fg=typer.colors.YELLOW)
        for line in problems.examples(kind, 3):
            typer.echo(f"  {line}")


TOKEN_FILE = typer.Option(
    None, "--token-file", help="A file holding the Label Studio API token (default: LABEL_STUDIO_API_KEY)."
)
PENDING = 3  # `labels pull`: tasks are still unlabelled, nothing imported


@labels_app.command("push")
def labels_push(
    run_uri: str = typer.Argument(..., help="The run's storage URI."),
    labelstudio: str = typer.Option(..., "--labelstudio", help="Label Studio's URL, e.g. http://localhost:8080."),
    project: str = typer.Option(..., "--project", help="The project's title: reused when it exists, else created."),
    token_file: Path = TOKEN_FILE,
    document_root: str = typer.Option(
        None,
        help="Local images: the server's LOCAL_FILES_DOCUMENT_ROOT, a parent of their folder (default: the pool's "
        "image root); tasks point at /data/local-files/?d=<path under it>.",
    ),
    url_prefix: str = typer.Option(None, help="data.image = PREFIX + file name instead (images served elsewhere)."),
    predictions: bool = typer.Option(True, help="The cycle's model's detections as pre-annotations."),
    min_score: float = typer.Option(0.5, min=0.0, max=1.0, help="Lowest confidence of a pre-annotation."),
    endpoint: str = ENDPOINT,
) -> None:
    """Make the images the run waits for tasks of a Label Studio project (with the model's detections as
    predictions) and record in the run which task is which image."""
    from almdn_ray.labels import LabelImportError
    from almdn_ray.labelstudio import LabelStudioError, push_selection, read_token

    use_endpoint(endpoint)
    try:
        token = read_token(token_file)
        job, pool = run_of(run_uri)
        detections = pre_annotations(run_uri, job, pool, predictions, min_score)
        root = document_root if document_root is not None else pool_image_root(job)
        pushed = push_selection(
            run_uri, pool, url=labelstudio, token=token, project=project, predictions=detections,
            image_root=root, url_prefix=url_prefix,
        )  # fmt: skip
    except (LabelStudioError, LabelImportError, FileNotFoundError, OSError, ValueError) as error:
        raise fail(str(error)) from error
    typer.echo(
        f"pushed {pushed.tasks} tasks to {pushed.url} project {pushed.project!r} (#{pushed.project_id}): "
        f"{pushed.created} new, {pushed.tasks - pushed.created} already there; "
        f"{pushed.predictions} pre-annotations\nrecorded in {pushed.record}; "
        f"when they are labelled: almdn-ray labels pull {run_uri}"
    )


@labels_app.command("pull")
def labels_pull(
    run_uri: str = typer.Argument(..., help="The run's storage URI."),
    token_file: Path = TOKEN_FILE,
    labelstudio: str = typer.Option(None, "--labelstudio", help="Label Studio's URL (default: the one pushed to)."),
    endpoint: str = ENDPOINT,
) -> None:
    """Import the annotations of the pushed tasks with every check of `labels import`; exit 3, importing
    nothing, while tasks are unlabelled."""
    from almdn_ray.labels import LabelImportError
    from almdn_ray.labelstudio import LabelStudioError, pull_labels, pushed_for, read_token

    use_endpoint(endpoint)
    try:
        token = read_token(token_file)
        pushed_for(run_uri)  # a run that has taken these labels already says so, naming the tasks
        _, pool = run_of(run_uri)
        pulled = pull_labels(run_uri, pool, token=token, url=labelstudio)
    except (LabelStudioError, LabelImportError, FileNotFoundError, OSError, ValueError) as error:
        raise fail(str(error)) from error
    if pulled.summary is None:
        skipped = f" ({len(pulled.skipped)} skipped: {pulled.skipped[:10]})" if pulled.skipped else ""
        typer.echo(
            f"{len(pulled.unlabelled)} of {pulled.tasks} tasks still unlabelled{skipped}: tasks "
            f"{pulled.unlabelled[:10]}{' …' if len(pulled.unlabelled) > 10 else ''}; nothing imported; pull again "
            "when every task has an annotation (an image without objects: submit it with no boxes)"
        )
        raise typer.Exit(code=PENDING)
    print_warnings(pulled.summary.problems)
    typer.echo(
        f"imported {pulled.summary.boxes} boxes on {pulled.summary.images} images from Label Studio; "
        "continue with `almdn-ray run JOB.yaml`"
    )
