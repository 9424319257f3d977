"""Ray Train glue: DDP across workers around :func:`almdn_ray.training.train_worker`."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from almdn_ray import storage
from almdn_ray.data.records import ImageRecord
from almdn_ray.data.transforms import DetectionDataset, eval_transform, train_transform
from almdn_ray.distributed import placement
from almdn_ray.model.backbones import BackboneWeightsError, load_state_dict_file
from almdn_ray.model.detector import ModelSpec
from almdn_ray.training import TrainRecipe, train_worker

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "train_distributed"]

STATE_FILE = "state.pt"


class RayTrainContext:
    """:class:`~almdn_ray.training.WorkerContext` on a Ray Train worker."""

    def __init__(self):
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap(self, model):
        return ray.train.torch.prepare_model(model) if self.world_size > 1 else model

    def latest_checkpoint(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)

    def report(self, metrics: dict[str, Any], state: dict | None) -> None:
        if state is None:  # report() is a collective: every rank calls it
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, os.path.join(folder, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def _tensor(self, value: float) -> torch.Tensor:
        return torch.tensor([value], dtype=torch.float64, device=self.device)

    def all_max(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = self._tensor(value)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def all_gather(self, value: float) -> list[float]:
        if self.world_size == 1:
            return [value]
        parts = [self._tensor(0.0) for _ in range(self.world_size)]
        dist.all_gather(parts, self._tensor(value))
        return [float(p.item()) for p in parts]


def _worker(config: dict) -> None:
    logging.basicConfig(level=logging.INFO)
    storage.configure(**config["storage_settings"])
    torch.set_num_threads(config["threads"])
    spec, recipe = ModelSpec(**config["spec"]), TrainRecipe(**config["recipe"])
    size = spec.input_size
    transform = train_transform(size, flip=recipe.flip) if recipe.augment else eval_transform(size)
    init = config.get("init_weights")
    init_weights = torch.load(io.BytesIO(storage.read_bytes(init)), weights_only=True) if init else None
    backbone = ray.get(config["backbone"]) if config["backbone"] is not None else None
    train_worker(
        spec=spec,
        dataset=DetectionDataset(config["records"], transform),
        recipe=recipe,
        context=RayTrainContext(),
        init_weights=init_weights,
        backbone=backbone,
        mixed_precision=config["mixed_precision"],
    )


def _backbone_ref(spec: ModelSpec, storage_uri: str, run_name: str, init_weights_uri: str | None):
    """The backbone file, read once here and shared through the object store, when training starts from it:
    not for a warm start, nor when a checkpoint of this run exists (its weights replace the backbone's)."""
    if spec.backbone_weights is None or init_weights_uri is not None:
        return None
    folder = storage.join(storage_uri, run_name)
    if storage.exists(folder) and storage.list_files(folder, pattern="checkpoint_*/" + STATE_FILE):
        return None
    state = load_state_dict_file(spec.backbone_weights)
    try:
        spec.build(backbone=state)  # a file that does not fit is refused here, before any worker starts
    except BackboneWeightsError as error:
        raise BackboneWeightsError(f"{spec.backbone_weights} (model.backbone_weights): {error}") from None
    return ray.put(state)


@dataclass(frozen=True)
class TrainResult:
    """Where the final weights are (a plain ``state_dict``) and the last reported metrics."""

    model_uri: str
    metrics: dict


def train_distributed(
    *,
    records: list[ImageRecord],
    spec: ModelSpec,
    recipe: TrainRecipe,
    storage_uri: str,
    run_name: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    max_failures: int = 1,
    init_weights_uri: str | None = None,
    endpoint: str | None = None,
    cpus_per_worker: float | None = None,
    mixed_precision: bool = True,
    placement_timeout_s: float = 30.0,
) -> TrainResult:
    """Train with Ray Train (DDP: gloo on CPU, NCCL on GPU), checkpoints under ``storage_uri/run_name``.

    Running again with the same ``storage_uri`` and ``run_name`` resumes from the latest checkpoint (Ray
    Train V2); a worker that dies is replaced and resumes from it too (``max_failures``). The final weights
    are written to ``storage_uri/model.pt``.

    Each worker asks for what one node can give (:func:`~almdn_ray.distributed.placement.plan_workers`); a
    request no node set can hold fails after ``placement_timeout_s`` naming the request and the nodes.

    Args:
        init_weights_uri: a ``state_dict`` to start from (warm start from the previous cycle's model).
        cpus_per_worker: CPUs per worker (default: the most that places every worker).
        mixed_precision: bf16 autocast on CUDA.
    """
    fs, path = storage.resolve(storage_uri, endpoint=endpoint)  # pickled to the workers with its retry settings
    request = placement.wait_for_fit(
        lambda nodes: placement.plan_workers(
            nodes, what="training workers", count=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker
        ),
        timeout_s=placement_timeout_s,
    )
    trainer = ray.train.torch.TorchTrainer(
        _worker,
        train_loop_config={
            "spec": asdict(spec),
            "recipe": asdict(recipe),
            "records": records,
            "init_weights": init_weights_uri,
            "backbone": _backbone_ref(spec, storage_uri, run_name, init_weights_uri),
            "threads": placement.torch_threads(request.cpus),
            "storage_settings": storage.settings(endpoint),
            "mixed_precision": mixed_precision,
        },
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=request.bundle()
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    logger.info("training %s with %s into %s", run_name, request.describe(), storage_uri)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {run_name} finished without a checkpoint in {storage_uri}")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    buffer = io.BytesIO()
    torch.save(state["model"], buffer)
    model_uri = storage.join(storage_uri, "model.pt")
    storage.write_bytes(model_uri, buffer.getvalue(), endpoint=endpoint)
    logger.info("final weights (iteration %d) written to %s", state["iteration"], model_uri)
    return TrainResult(model_uri, dict(result.metrics))
