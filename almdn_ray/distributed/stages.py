"""The Ray versions of the cycle's heavy stages, and connecting to Ray."""

from __future__ import annotations

import logging
import os

import ray

from almdn_ray.config import JobSpec
from almdn_ray.cycle import StageFunctions, local_evaluate
from almdn_ray.data.records import ImageRecord
from almdn_ray.distributed.score_pool import score_pool
from almdn_ray.distributed.train import train_distributed
from almdn_ray.model.detector import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["connect", "ray_stage_functions"]

_FORWARDED = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def connect(job: JobSpec) -> None:
    """Attach to the cluster in ``RAY_ADDRESS`` (inside a Ray Job, or a cluster you started), else start a
    local Ray. Storage settings are forwarded to the workers."""
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _FORWARDED if k in os.environ}
    if job.storage.endpoint:
        env["AWS_ENDPOINT_URL"] = job.storage.endpoint
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # inside a Ray Job: `submit` already set the job's env
        env = {}
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address or "local",  # never attach to a cluster `ray start` recorded on this machine
        runtime_env={"env_vars": env} if env else None,
        logging_level="WARNING",
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = bool(os.environ.get("ALMDN_RAY_PROGRESS", "1") == "1")
    logger.info("Ray: %s", address or "local")


def _train(
    records: list[ImageRecord],
    spec: ModelSpec,
    job: JobSpec,
    storage_uri: str,
    run_name: str,
    init_weights_uri: str | None,
) -> str:
    return train_distributed(
        records=records,
        spec=spec,
        recipe=job.train,
        storage_uri=storage_uri,
        run_name=run_name,
        num_workers=job.resources.num_workers,
        use_gpu=job.resources.use_gpu,
        init_weights_uri=init_weights_uri,
        endpoint=job.storage.endpoint,
    ).model_uri


def _score(
    manifest_uri: str, weights_uri: str, out_uri: str, spec: ModelSpec, job: JobSpec, member_uris: list[str] = ()
) -> None:
    score_pool(
        manifest_uri=manifest_uri,
        weights_uri=weights_uri,
        member_uris=member_uris,
        mc_passes=job.acquisition.mc_passes if job.acquisition.strategy == "mc_dropout" else 0,
        out_uri=out_uri,
        spec=spec,
        postprocess=job.acquisition.postprocess(),
        use_gpu=job.resources.use_gpu,
        num_actors=job.resources.scoring_actors,
        batch_size=job.resources.scoring_batch_size,
        endpoint=job.storage.endpoint,
    )


def ray_stage_functions() -> StageFunctions:
    return StageFunctions(train=_train, score=_score, evaluate=local_evaluate)
