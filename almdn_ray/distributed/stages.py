"""The Ray versions of the cycle's heavy stages, and connecting to Ray."""

from __future__ import annotations

import logging
import os

import ray

from almdn_ray import storage
from almdn_ray.config import JobSpec
from almdn_ray.cycle import StageFunctions
from almdn_ray.data.records import Dataset, ImageRecord
from almdn_ray.distributed.evaluate import evaluate_remote
from almdn_ray.distributed.score_pool import score_pool
from almdn_ray.distributed.train import train_distributed
from almdn_ray.model.detector import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["connect", "ray_stage_functions"]


_LOG_FILE: logging.Handler | None = None
# Ray's own loggers that write to the terminal (Ray Data's INFO blocks, Ray Train's status, the token
# authentication warning of a local ray.init).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def log_ray_to(handler: logging.Handler | None) -> None:
    """Send Ray's driver-side logs to ``handler`` (a file in the run) instead of the terminal, from now on and
    when Ray Data reconfigures its logger; None detaches the previous handler."""
    global _LOG_FILE
    if _LOG_FILE is not None and handler is None:
        for name in RAY_LOGGERS:
            logging.getLogger(name).removeHandler(_LOG_FILE)
    _LOG_FILE = handler
    _route_ray_logs()


def _route_ray_logs() -> None:
    if _LOG_FILE is None:
        return
    for name in RAY_LOGGERS:
        ray_logger = logging.getLogger(name)
        for existing in list(ray_logger.handlers):
            if isinstance(existing, logging.StreamHandler) and not isinstance(existing, logging.FileHandler):
                ray_logger.removeHandler(existing)
        if _LOG_FILE not in ray_logger.handlers:
            ray_logger.addHandler(_LOG_FILE)
        ray_logger.propagate = False


def connect(job: JobSpec) -> None:
    """Attach to the cluster in ``RAY_ADDRESS`` (inside a Ray Job, or a cluster you started), else start a
    local Ray.

    Nothing is put in a runtime environment: Ray stores it with the job, where anyone holding the cluster's
    token can read it. A local Ray's workers inherit this process's environment; a cluster's workers use the
    cluster's own (its secret, instance profile or environment). The S3 endpoint and retry settings travel with
    each stage.
    """
    storage.configure(**job.storage.settings())
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    _route_ray_logs()
    ray.init(
        address=address or "local",  # never attach to a cluster `ray start` recorded on this machine
        logging_level="WARNING",
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = bool(os.environ.get("ALMDN_RAY_PROGRESS", "1") == "1")
    _route_ray_logs()  # ray.init may have (re)configured them
    logger.info("Ray: %s", address or "local")


def _train(
    records: list[ImageRecord],
    spec: ModelSpec,
    job: JobSpec,
    storage_uri: str,
    run_name: str,
    init_weights_uri: str | None,
) -> str:
    r = job.resources
    return train_distributed(
        records=records,
        spec=spec,
        recipe=job.train,
        storage_uri=storage_uri,
        run_name=run_name,
        num_workers=r.num_workers,
        use_gpu=r.use_gpu,
        init_weights_uri=init_weights_uri,
        endpoint=job.storage.endpoint,
        cpus_per_worker=r.cpus_per_worker,
        mixed_precision=r.mixed_precision,
        placement_timeout_s=r.placement_timeout_s,
    ).model_uri


def _score(
    manifest_uri: str, weights_uri: str, out_uri: str, spec: ModelSpec, job: JobSpec, member_uris: list[str] = ()
) -> None:
    r = job.resources
    score_pool(
        manifest_uri=manifest_uri,
        weights_uri=weights_uri,
        member_uris=member_uris,
        mc_passes=job.acquisition.mc_passes if job.acquisition.strategy == "mc_dropout" else 0,
        out_uri=out_uri,
        spec=spec,
        postprocess=job.acquisition.postprocess(),
        use_gpu=r.use_gpu,
        num_actors=r.scoring_actors,
        batch_size=r.scoring_batch,
        endpoint=job.storage.endpoint,
        split_decode=r.split_decode,
        mixed_precision=r.mixed_precision,
        placement_timeout_s=r.placement_timeout_s,
        embedding_dims=job.acquisition.embedding_dims,
    )


def _evaluate(weights_uri: str, dataset: Dataset, spec: ModelSpec, job: JobSpec) -> dict:
    r = job.resources
    return evaluate_remote(
        weights_uri,
        dataset,
        spec,
        use_gpu=r.use_gpu,
        batch_size=r.eval_batch_size,
        cpus=r.cpus_per_worker,
        mixed_precision=r.mixed_precision,
        endpoint=job.storage.endpoint,
        placement_timeout_s=r.placement_timeout_s,
    )


def ray_stage_functions(job: JobSpec | None = None) -> StageFunctions:
    """The Ray stage functions; with ``job``, each connects to Ray (:func:`connect`) on its first call, so a
    run that only waits for labels (a cold start) never starts Ray."""
    if job is None:
        return StageFunctions(train=_train, score=_score, evaluate=_evaluate)

    def connected(function):
        def call(*args, **kwargs):
            connect(job)
            return function(*args, **kwargs)

        return call

    return StageFunctions(train=connected(_train), score=connected(_score), evaluate=connected(_evaluate))
