"""Ray Jobs glue: submit a run to a cluster, follow it, read its logs, stop it (token auth supported)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

import almdn_ray
from almdn_ray import storage
from almdn_ray.config import SpecError, load_spec

logger = logging.getLogger(__name__)

__all__ = ["resolve_token", "client", "cluster_environment", "submit_job", "wait_for", "job_logs", "stop_job"]

# What the cluster's own environment (a Kubernetes secret, an instance profile, the nodes' environment) must
# provide for S3 storage: `submit` never sends these; Ray would store them with the job for anyone to read.
CLUSTER_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION")


def cluster_environment(spec) -> str | None:
    """What the cluster must provide for this job's storage, in one line (None for local storage)."""
    uris = [spec.storage.uri, spec.dataset.train, spec.dataset.test, spec.model.backbone_weights or ""]
    if not any(storage.is_remote(u) for u in uris):
        return None
    endpoint = f"; S3 endpoint {spec.storage.endpoint} (storage.endpoint)" if spec.storage.endpoint else ""
    return (
        "the cluster must provide S3 credentials itself: an instance profile / IAM role, or "
        f"{', '.join(CLUSTER_CREDENTIALS[:2])} (and {', '.join(CLUSTER_CREDENTIALS[2:])} if used) in the nodes' "
        f"environment (cluster/: the aws-credentials secret){endpoint}; nothing secret is sent with the job"
    )


TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def resolve_token(token: str | None) -> str | None:
    """The Ray auth token: the argument, ``RAY_AUTH_TOKEN``, or ``~/.ray/auth_token`` (as Ray writes it)."""
    if token:
        return token
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled" and path.is_file():
        return path.read_text().strip() or None
    return None


def client(address: str, token: str | None = None) -> JobSubmissionClient:
    token = resolve_token(token)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError … depending on what failed
        raise ConnectionError(
            f"cannot reach the Ray job server at {address} ({error}); check --address (the "
            "dashboard URL, e.g. http://head:8265) and, with token auth, RAY_AUTH_TOKEN"
        ) from error


def submit_job(
    job_file: str | Path, address: str, *, token: str | None = None, submission_id: str | None = None
) -> str:
    """Send the driver to the cluster as a Ray Job running ``python -m almdn_ray run job.yaml``.

    The job spec and the package's source travel in the job's working directory; the dependencies (torch,
    torchvision, ray, ...) must already be installed on the cluster (see cluster/). Paths in the spec are
    read on the cluster: use absolute paths or ``s3://``.
    """
    spec = load_spec(job_file)  # refuse a bad spec before it reaches the cluster
    if not storage.is_remote(spec.storage.uri) and not os.path.isabs(spec.storage.uri.removeprefix("file://")):
        raise SpecError(
            f"{job_file}: storage.uri {spec.storage.uri!r} is relative; on a cluster it would land in the job's "
            "temporary folder and be deleted. Give an absolute path on shared storage or s3://bucket/prefix"
        )
    folder = tempfile.mkdtemp(prefix="almdn-ray-job-")
    shutil.copy(job_file, os.path.join(folder, "job.yaml"))
    # The job runs this very version of the package: its source travels in the working directory, which
    # Ray puts first on the driver's and every worker's path. Its dependencies must be on the cluster.
    shutil.copytree(
        Path(almdn_ray.__file__).parent,
        os.path.join(folder, "almdn_ray"),
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    needs = cluster_environment(spec)
    if needs:
        logger.info("%s", needs)
    job_id = client(address, token).submit_job(
        entrypoint="python -m almdn_ray run job.yaml",
        runtime_env={"working_dir": folder},
        submission_id=submission_id,
        metadata={"almdn_ray_run": spec.storage.uri, "almdn_ray_name": spec.name},
    )
    logger.info("submitted %s as Ray job %s", job_file, job_id)
    return job_id


def wait_for(
    job_id: str,
    address: str,
    *,
    token: str | None = None,
    timeout_s: float | None = None,
    on_status: Callable[[str], None] | None = None,
) -> str:
    """Poll until the job ends; returns its final status."""
    jobs = client(address, token)
    start, last = time.time(), None
    while True:
        status = jobs.get_job_status(job_id)
        if status != last and on_status is not None:
            on_status(str(status))
        last = status
        if status in TERMINAL:
            return str(status)
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"Ray job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(1.0)


def job_logs(job_id: str, address: str, *, token: str | None = None) -> str:
    return client(address, token).get_job_logs(job_id)


def stop_job(job_id: str, address: str, *, token: str | None = None) -> bool:
    return client(address, token).stop_job(job_id)
