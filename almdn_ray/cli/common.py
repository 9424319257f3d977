"""What every command group shares: the Typer apps, error exits, progress bars, run lookups."""

from __future__ import annotations

import logging
import sys
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
pool_app = typer.Typer(
    help="Build the pool's Parquet manifest; add images to a run's pool; list its near-duplicates.",
    no_args_is_help=True,
)
labels_app = typer.Typer(
    help="Human labelling: export the selection, import the labels; or push to and pull from Label Studio.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
app.add_typer(pool_app, name="pool")
app.add_typer(labels_app, name="labels")


def print_version(value: bool) -> None:
    if value:
        typer.echo(f"almdn-ray {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=print_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
) -> None:
    """Active learning for object detection with AL-MDN, distributed on Ray."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def verbose_logging() -> bool:
    return logging.getLogger().getEffectiveLevel() <= logging.INFO


def run_log_file(job) -> logging.FileHandler:
    """A log file for this invocation: ``RUN/logs/driver.log`` for a local run folder, else
    ``./almdn-ray-logs/<name>.log``. The root logger writes INFO there (the terminal keeps WARNING and up)."""
    uri = job.storage.uri
    if uri.startswith("s3://"):
        path = Path("almdn-ray-logs") / f"{job.name}.log"
    else:
        path = Path(uri.removeprefix("file://")) / "logs" / "driver.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    for console in root.handlers:
        if getattr(console, "stream", None) in (sys.stdout, sys.stderr):  # the terminal, not pytest's capture
            console.setLevel(max(console.level, logging.WARNING))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1)


@contextmanager
def progress(description: str, total: int | None):
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


ENDPOINT = typer.Option(
    None, "--endpoint", help="S3-compatible endpoint URL of the run's storage (default: AWS_ENDPOINT_URL)."
)


def use_endpoint(endpoint: str | None) -> None:
    from almdn_ray import storage

    storage.configure(endpoint=endpoint)


def load_job(job_file: Path):
    from almdn_ray.config import SpecError, load_spec

    try:
        return load_spec(job_file)
    except SpecError as error:
        raise fail(str(error)) from error


def job_of(run_uri: str):
    """The job a run was started with (its frozen ``job.yaml``)."""
    import yaml

    from almdn_ray import storage
    from almdn_ray.config import spec_from_dict
    from almdn_ray.cycle import RunLayout

    layout = RunLayout(run_uri)
    if not storage.exists(layout.job):
        raise FileNotFoundError(f"{run_uri}: no run here (no job.yaml); check the storage URI")
    job = spec_from_dict(yaml.safe_load(storage.read_bytes(layout.job)), layout.job)
    # The job's storage settings (retries, timeouts, endpoint); an --endpoint given to the command wins.
    storage.configure(**{**job.storage.settings(), "endpoint": storage.configured_endpoint() or job.storage.endpoint})
    return job


def run_of(run_uri: str):
    """The run's job and the part of its frozen pool that the labels it waits for concern."""
    from almdn_ray.cycle import RunLayout
    from almdn_ray.data.manifest import read_manifest, read_marker
    from almdn_ray.data.pool import load_pool
    from almdn_ray.labels import awaited_ids

    job = job_of(run_uri)
    layout = RunLayout(run_uri)
    ids = awaited_ids(run_uri)
    table = read_manifest(layout.pool, ids=ids) if read_marker(layout.pool) is not None else None
    return job, load_pool(job.dataset, table=table)


def pool_image_root(job) -> str | None:
    """Where the pool's file names are relative to: a COCO pool's image root, a VOC devkit's folder."""
    import os
    import posixpath

    d = job.dataset
    if d.train_image_root:
        return d.train_image_root
    if str(d.train).lower().endswith(".json"):
        return posixpath.dirname(d.train) if "://" in d.train else os.path.dirname(os.path.abspath(d.train))
    return None
