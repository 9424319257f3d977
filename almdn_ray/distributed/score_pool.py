"""Ray Data glue: score the pool manifest with one model per actor, write one Parquet row per image."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import numpy as np
import ray
import ray.data
import torch

from almdn_ray import scoring, storage
from almdn_ray.model.detector import ModelSpec
from almdn_ray.model.postprocess import PostprocessConfig

logger = logging.getLogger(__name__)

__all__ = ["PoolScorer", "plan_actors", "score_pool"]


class PoolScorer:
    """Callable class for ``map_batches``: loads the model once per actor, maps numpy dict -> numpy dict."""

    def __init__(
        self,
        spec: dict,
        weights_uri: str | None,
        postprocess: dict,
        threads: int,
        member_uris: list[str] = (),
        mc_passes: int = 0,
    ):
        torch.set_num_threads(threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = scoring.load_model(ModelSpec(**spec), weights_uri, device)
        self.members = [scoring.load_model(ModelSpec(**spec), uri, device) for uri in member_uris]
        self.mc_passes = mc_passes
        self.config = PostprocessConfig(**postprocess)
        self.worker = f"{ray.get_runtime_context().get_node_id()[:12]}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return scoring.score_images(
            self.model,
            batch["image_id"],
            batch["uri"],
            config=self.config,
            worker=self.worker,
            members=self.members,
            mc_passes=self.mc_passes,
        )


def plan_actors(*, use_gpu: bool, num_actors: int | None) -> tuple[int, float]:
    """How many actors, and CPUs per actor, so that the actors never take every CPU of the cluster.

    Ray Data's read and write tasks need a CPU too: an actor pool holding all CPUs deadlocks on a small node.
    On GPU there is one actor per GPU, on CPU one per core (each a fraction of a CPU, one torch thread),
    unless ``num_actors`` says otherwise.
    """
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if use_gpu and gpus < 1:
        raise RuntimeError("scoring.use_gpu is set but the Ray cluster has no GPU; unset it or add GPU nodes")
    actors = num_actors or (gpus if use_gpu else max(1, int(cpus)))
    cpus_per_actor = min(1.0, max(0.1, (cpus - 1.0) / actors))
    return actors, round(cpus_per_actor, 2)


def score_pool(
    *,
    manifest_uri: str,
    weights_uri: str | None,
    out_uri: str,
    spec: ModelSpec,
    postprocess: PostprocessConfig = PostprocessConfig(),
    use_gpu: bool = False,
    num_actors: int | None = None,
    batch_size: int = 16,
    rows_per_block: int = 256,
    endpoint: str | None = None,
    member_uris: list[str] = (),
    mc_passes: int = 0,
) -> str:
    """Score every manifest row into Parquet files under ``out_uri`` (overwritten, so a rerun is idempotent).

    ``member_uris`` (further ensemble members' weights) or ``mc_passes`` (T dropout passes) add the committee
    columns that the ``ensemble`` and ``mc_dropout`` strategies select by.

    Returns:
        ``out_uri``. Read it with :func:`almdn_ray.scoring.read_scores`.
    """
    in_fs, in_path = storage.resolve(manifest_uri, endpoint=endpoint)
    out_fs, out_path = storage.resolve(out_uri, endpoint=endpoint)
    actors, cpus_per_actor = plan_actors(use_gpu=use_gpu, num_actors=num_actors)
    logger.info(
        "scoring %s with %d actor(s) (%s CPU%s each) into %s",
        manifest_uri,
        actors,
        cpus_per_actor,
        ", 1 GPU" if use_gpu else "",
        out_uri,
    )
    dataset = ray.data.read_parquet(in_path, filesystem=in_fs).select_columns(["image_id", "uri"])
    # Small manifests arrive as one block, which one actor would score alone: cut them into blocks.
    dataset = dataset.repartition(target_num_rows_per_block=rows_per_block)
    scored = dataset.map_batches(
        PoolScorer,
        fn_constructor_kwargs={
            "spec": asdict(spec),
            "weights_uri": weights_uri,
            "postprocess": asdict(postprocess),
            "threads": max(1, int(cpus_per_actor)),
            "member_uris": list(member_uris),
            "mc_passes": mc_passes,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )  # Ray Data restarts dead actors and retries their batches by default
    scored.write_parquet(out_path, filesystem=out_fs, mode=ray.data.SaveMode.OVERWRITE)
    return out_uri
