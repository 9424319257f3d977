"""Ray Jobs on a cluster: `submit`, `logs`, `stop`."""

from __future__ import annotations

from pathlib import Path

import typer

from almdn_ray.cli.common import app, fail, load_job

ADDRESS = typer.Option(..., "--address", envvar="RAY_JOB_ADDRESS", help="Ray dashboard URL, e.g. http://head:8265.")
TOKEN = typer.Option(None, "--token", envvar="RAY_AUTH_TOKEN", help="Ray auth token (default ~/.ray/auth_token).")


@app.command()
def submit(
    job_file: Path = typer.Argument(..., help="Job spec YAML."),
    address: str = ADDRESS,
    token: str = TOKEN,
    wait: bool = typer.Option(False, "--wait", help="Follow the job until it ends; exit 1 unless it succeeded."),
    submission_id: str = typer.Option(None, help="Job id to use (default: Ray picks one)."),
) -> None:
    """Send the run's driver to a Ray cluster as a Ray Job."""
    from almdn_ray.config import SpecError
    from almdn_ray.distributed import submit as jobs

    spec = load_job(job_file)
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
                raise fail(f"Ray job {job_id} ended {final}; see `almdn-ray logs {job_id} --address {address}`")
    except (ConnectionError, TimeoutError, RuntimeError, SpecError) as error:
        raise fail(str(error)) from error


@app.command()
def logs(job_id: str = typer.Argument(...), address: str = ADDRESS, token: str = TOKEN) -> None:
    """Print a submitted job's logs."""
    from almdn_ray.distributed import submit as jobs

    try:
        typer.echo(jobs.job_logs(job_id, address, token=token))
    except (ConnectionError, RuntimeError) as error:
        raise fail(str(error)) from error


@app.command()
def stop(job_id: str = typer.Argument(...), address: str = ADDRESS, token: str = TOKEN) -> None:
    """Stop a submitted job (its finished stages stay; submit again to resume)."""
    from almdn_ray.distributed import submit as jobs

    try:
        stopped = jobs.stop_job(job_id, address, token=token)
    except (ConnectionError, RuntimeError) as error:
        raise fail(str(error)) from error
    typer.echo(f"{job_id}: {'stopping' if stopped else 'not running'}")
