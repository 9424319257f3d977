"""Ray glue for EVAL: the test split is evaluated by a Ray task on a worker node (a GPU with ``use_gpu``),
sized like one training worker; the driver receives only the metrics."""

from __future__ import annotations

import logging
import os

import ray
import torch

from almdn_ray import engine, scoring, storage
from almdn_ray.data.records import Dataset
from almdn_ray.distributed import placement
from almdn_ray.evaluation import evaluate
from almdn_ray.model.detector import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["evaluate_remote"]


def _evaluate(
    weights_uri: str, dataset: Dataset, spec: ModelSpec, *, batch_size: int, threads: int, loaders: int, **options
) -> dict:
    storage.configure(**options["storage_settings"])
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = scoring.load_model(spec, weights_uri, device)
    metrics = evaluate(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        data_workers=loaders,
        bf16=engine.use_bf16(device, options["mixed_precision"]),
    )
    metrics["eval_node"] = ray.get_runtime_context().get_node_id()
    metrics["eval_worker"] = f"{metrics['eval_node'][:12]}:{os.getpid()}"
    return metrics


def evaluate_remote(
    weights_uri: str,
    dataset: Dataset,
    spec: ModelSpec,
    *,
    use_gpu: bool,
    batch_size: int,
    cpus: float | None = None,
    mixed_precision: bool = True,
    endpoint: str | None = None,
    placement_timeout_s: float = 30.0,
) -> dict:
    """VOC and COCO AP of ``weights_uri`` on ``dataset``, computed by one Ray task on a worker node.

    The task takes the CPUs of one node's worker share (decoding runs in ``cpus - 1`` loader processes
    when there is a GPU to feed) and one GPU with ``use_gpu``.
    """
    request = placement.wait_for_fit(
        lambda nodes: placement.plan_workers(nodes, what="EVAL", count=1, use_gpu=use_gpu, cpus_per_worker=cpus),
        timeout_s=placement_timeout_s,
    )
    threads = placement.torch_threads(request.cpus)
    logger.info("EVAL of %s on %d images with %s", weights_uri, len(dataset.records), request.describe())
    task = ray.remote(_evaluate).options(num_cpus=request.cpus, num_gpus=request.gpus, max_retries=1)
    return ray.get(
        task.remote(
            weights_uri,
            dataset,
            spec,
            batch_size=batch_size,
            threads=threads,
            loaders=max(0, threads - 1) if use_gpu else 0,
            mixed_precision=mixed_precision,
            storage_settings=storage.settings(endpoint),
        )
    )
