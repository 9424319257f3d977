"""Ray Data glue: score the pool manifest with one model per actor, write one Parquet row per image.

The pipeline is GPU-shaped: read + decode + resize run as Ray Data CPU tasks over every node's cores, and
the model actors (one per GPU) do only the forward pass and the per-image summary. On CPU the actors decode
themselves by default (``resources.decode_in_tasks``), which saves moving the pixels between processes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import numpy as np
import ray
import ray.data
import torch

from almdn_ray import engine, scoring, storage
from almdn_ray.distributed import placement
from almdn_ray.model.detector import ModelSpec
from almdn_ray.model.embeddings import Embedder
from almdn_ray.model.postprocess import PostprocessConfig

logger = logging.getLogger(__name__)

__all__ = ["PoolScorer", "decode_batch", "score_pool"]


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, storage_settings: dict) -> dict[str, np.ndarray]:
    """A Ray Data CPU task: the batch's images read, decoded and resized (``image`` uint8 ``[B, 3, S, S]``)."""
    storage.configure(**storage_settings)
    images, errors = scoring.decode_images(batch["uri"], image_size)
    return {"image_id": batch["image_id"], "image": images, "decode_error": np.asarray(errors, dtype=object)}


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
        mixed_precision: bool = True,
        storage_settings: dict | None = None,
        embedding_dims: int = 0,
    ):
        storage.configure(**(storage_settings or {"endpoint": None}))
        torch.set_num_threads(threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = scoring.load_model(ModelSpec(**spec), weights_uri, device)
        self.members = [scoring.load_model(ModelSpec(**spec), uri, device) for uri in member_uris]
        self.mc_passes = mc_passes
        self.bf16 = engine.use_bf16(device, mixed_precision)
        self.config = PostprocessConfig(**postprocess)
        self.embedder = (
            Embedder(embedding_dims, max_objects=scoring.MAX_OBJECT_EMBEDDINGS) if embedding_dims else None
        )  # same projection on every actor
        self.worker = f"{ray.get_runtime_context().get_node_id()[:12]}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = (batch["image"], list(batch["decode_error"])) if "image" in batch else None
        return scoring.score_images(
            self.model,
            batch["image_id"],
            batch.get("uri"),
            decoded=decoded,
            config=self.config,
            worker=self.worker,
            members=self.members,
            mc_passes=self.mc_passes,
            bf16=self.bf16,
            embedder=self.embedder,
        )


def score_pool(
    *,
    manifest_uri: str,
    weights_uri: str | None,
    out_uri: str,
    spec: ModelSpec,
    postprocess: PostprocessConfig = PostprocessConfig(),
    use_gpu: bool = False,
    num_actors: int | None = None,
    batch_size: int | None = None,
    rows_per_block: int = 256,
    endpoint: str | None = None,
    member_uris: list[str] = (),
    mc_passes: int = 0,
    split_decode: bool | None = None,
    mixed_precision: bool = True,
    placement_timeout_s: float = 30.0,
    embedding_dims: int = 0,
) -> str:
    """Score every manifest row into Parquet files under ``out_uri`` (overwritten, so a rerun is idempotent).

    ``member_uris`` (further ensemble members' weights) or ``mc_passes`` (T dropout passes) add the committee
    columns that the ``ensemble`` and ``mc_dropout`` strategies select by. ``split_decode`` (default: with
    ``use_gpu``) decodes in CPU tasks ahead of the model actors. ``embedding_dims`` > 0 also writes each image's
    and its confident detections' embeddings (from the same forward pass) for ``almdn_diverse`` and
    ``almdn-ray pool duplicates``. ``batch_size``: images per model batch (default: 256 on a GPU, 16 on CPU).

    On a GPU each actor takes two batches at a time in two threads (the host work of one, its upload and its
    Python, overlaps the device work of the other) and has up to four queued, so that the GPU never waits for
    the next batch; the decode tasks (a quarter of a GPU batch each) run on every other CPU of the cluster.

    Returns:
        ``out_uri``. Read it with :func:`almdn_ray.scoring.read_scores`.
    """
    settings = storage.settings(endpoint)  # the workers reach storage, and retry, as this process does
    split_decode = use_gpu if split_decode is None else split_decode
    batch_size = batch_size or (256 if use_gpu else 16)
    in_fs, in_path = storage.resolve(manifest_uri, endpoint=endpoint)
    out_fs, out_path = storage.resolve(out_uri, endpoint=endpoint)
    actors = placement.wait_for_fit(
        lambda nodes: placement.plan_scoring(nodes, use_gpu=use_gpu, num_actors=num_actors),
        timeout_s=placement_timeout_s,
    )
    logger.info(
        "scoring %s with %s%s into %s", manifest_uri, actors.describe(), ", decode in tasks" * split_decode, out_uri
    )
    dataset = ray.data.read_parquet(in_path, filesystem=in_fs).select_columns(["image_id", "uri"])
    # Small manifests arrive as one block, which one actor would score alone: cut them into blocks.
    dataset = dataset.repartition(target_num_rows_per_block=rows_per_block)
    if split_decode:
        dataset = dataset.map_batches(
            decode_batch,
            fn_kwargs={"image_size": spec.input_size, "storage_settings": settings},
            batch_size=max(1, batch_size // 4) if use_gpu else batch_size,
            batch_format="numpy",
            num_cpus=1,
        )
    # Two batches in flight in each GPU actor: its threads release the GIL while the device works.
    overlap = {"max_tasks_in_flight_per_actor": 4, "enable_true_multi_threading": True} if use_gpu else {}
    threads = {"max_concurrency": 2} if use_gpu else {}
    scored = dataset.map_batches(
        PoolScorer,
        fn_constructor_kwargs={
            "spec": asdict(spec),
            "weights_uri": weights_uri,
            "postprocess": asdict(postprocess),
            "threads": placement.torch_threads(actors.cpus),
            "member_uris": list(member_uris),
            "mc_passes": mc_passes,
            "mixed_precision": mixed_precision,
            "storage_settings": settings,
            "embedding_dims": embedding_dims,
        },
        batch_size=batch_size,
        batch_format="numpy",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=actors.count, **overlap),
        num_cpus=actors.cpus,
        num_gpus=actors.gpus,
        **threads,
    )  # Ray Data restarts dead actors and retries their batches by default
    scored.write_parquet(out_path, filesystem=out_fs, mode=ray.data.SaveMode.OVERWRITE)
    return out_uri
