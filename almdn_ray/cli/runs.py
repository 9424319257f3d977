"""Runs: `models`, `run`, `experiment`, `status`, `report`."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from almdn_ray.cli.common import ENDPOINT, app, fail, load_job, run_log_file, use_endpoint, verbose_logging


@app.command()
def models() -> None:
    """List the model presets: input size, backbone and head layout."""
    from almdn_ray.model import PRESETS

    for name, preset in PRESETS.items():
        head = "depthwise-separable" if preset.separable_head else "3x3 conv"
        typer.echo(f"{name}: {preset.image_size}x{preset.image_size} input, {preset.backbone} backbone, {head} head")


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

    job = load_job(job_file)
    try:
        from almdn_ray.distributed.placement import PlacementError
        from almdn_ray.distributed.stages import log_ray_to, ray_stage_functions

        log_file = None
        if not verbose_logging():
            log_file = run_log_file(job)
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
        raise fail(str(error)) from error
    finally:
        if log_file is not None:
            log_ray_to(None)
            logging.getLogger().removeHandler(log_file)
            log_file.close()
    if state.status == "finished":
        paths = write_report(job.storage.uri)
        typer.echo(f"finished: report at {paths['markdown']} (page: {paths['html']})")
    elif state.status == "awaiting_labels":
        typer.echo(
            f"waiting for labels: almdn-ray labels export {job.storage.uri} (a file for your tool), or "
            f"almdn-ray labels push {job.storage.uri} --labelstudio URL --project NAME (Label Studio's API)"
        )


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
    from dataclasses import replace

    from almdn_ray import storage
    from almdn_ray.config import SpecError
    from almdn_ray.data.records import DatasetError
    from almdn_ray.experiment import plan_runs, run_experiment, write_experiment_report, write_run_reports
    from almdn_ray.state import LeaseError

    job = load_job(job_file)
    out = out or f"{job.storage.uri.rstrip('/')}-experiment"
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    log_file = None
    try:
        runs = plan_runs(job, names, seeds, out, mc_dropout=mc_dropout)
        from almdn_ray.distributed.stages import connect, log_ray_to, ray_stage_functions

        if not verbose_logging():  # as `run`: Ray's and the stages' logs go to a file, one line per stage here
            log_file = run_log_file(replace(job, storage=replace(job.storage, uri=out)))
            log_ray_to(log_file)
            typer.echo(f"[almdn-ray] experiment {out}; Ray's and the stages' logs: {log_file.baseFilename}")
        connect(job)
        run_experiment(runs, ray_stage_functions(), progress=lambda m: typer.echo(f"[almdn-ray] {m}"))
        command = "almdn-ray " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        paths = write_experiment_report(runs, report_to or out, command=command)
        reports = write_run_reports(runs)
    except (SpecError, LeaseError, DatasetError, FileNotFoundError, RuntimeError, ValueError) as error:
        raise fail(str(error)) from error
    finally:
        if log_file is not None:
            from almdn_ray.distributed.stages import log_ray_to

            log_ray_to(None)
            logging.getLogger().removeHandler(log_file)
            log_file.close()
    typer.echo(storage.read_bytes(paths["markdown"]).decode())
    typer.echo(f"table: {paths['markdown']}\nplot: {paths['plot']}")
    if reports:
        typer.echo(f"each run's report, with the other strategies of its seed beside it: {reports[0]} …")


@app.command()
def status(
    run_uri: str = typer.Argument(..., help="The run's storage URI (storage.uri of its job spec)."),
    endpoint: str = ENDPOINT,
) -> None:
    """Show a run's cycles, stages, labelled counts and metrics, read from storage (no cluster needed)."""
    from almdn_ray.report import run_status

    use_endpoint(endpoint)
    try:
        info = run_status(run_uri)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise fail(str(error)) from error
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
def report(run_uri: str = typer.Argument(..., help="The run's storage URI."), endpoint: str = ENDPOINT) -> None:
    """Write report/curve.png, report/report.md (per-cycle table, most uncertain images) and report/report.html
    (every selection's picks with their boxes and terms, sortable and filterable; opens from disk)."""
    from almdn_ray.report import write_report

    use_endpoint(endpoint)
    try:
        paths = write_report(run_uri)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise fail(str(error)) from error
    typer.echo(
        f"report: {paths['markdown']}"
        + (f"\ncurve: {paths['curve']}" if paths["curve"] else " (no cycle evaluated yet)")
        + f"\npage: {paths['html']}"
    )
