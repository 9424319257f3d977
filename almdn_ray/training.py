"""The training recipe and the per-worker training loop, with no Ray: ``distributed/train.py`` supplies the
context (rank, checkpoints, reports) and tests supply a local one."""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from almdn_ray import engine
from almdn_ray.data.transforms import batch_jitter
from almdn_ray.model.detector import ModelSpec
from almdn_ray.model.loss import LossConfig, MultiboxMixtureLoss, check_labels

logger = logging.getLogger(__name__)

__all__ = ["TrainRecipe", "learning_rate", "WorkerContext", "LocalContext", "TrainingDiverged", "train_worker"]


@dataclass(frozen=True)
class TrainRecipe:
    """The paper's SSD recipe as defaults (iteration-based); every value can come from the job spec."""

    max_iterations: int = 120_000
    batch_size: int = 32  # in total, across workers
    optimizer: str = "sgd"  # "sgd" (the paper) | "adam" (converges faster from scratch, for small demos)
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_iterations: int = 1000  # lr * ((i + 1) / warmup) ** warmup_power
    warmup_power: float = 4.0
    lr_steps: tuple[int, ...] = (80_000, 100_000)
    lr_gamma: float = 0.1
    checkpoint_every: int = 1000
    grad_clip: float | None = None
    divergence_factor: float = 20.0  # a loss above this many times the recent median is exploding
    max_restarts: int = 2  # restarts from the last good checkpoint before one restart from scratch
    cls_loss: str = "type1"
    augment: bool = True
    flip: bool = True
    jitter: float = 0.0  # light batch augmentation (zoom/shift, colour), 0 = off; see data.transforms.batch_jitter
    data_workers: int | None = None  # loader processes per worker; None: 0 on CPU, up to 4 beside a GPU
    read_every: int = 10  # iterations between host reads of the losses (and the divergence check); <= checkpoints
    precise_bn_batches: int = 20
    seed: int = 0
    # Passes over the labelled set per cycle: the cycle trains ceil(epochs x labelled / batch_size) iterations
    # (at least min_iterations, at most max_iterations) and its lr_steps, warm-up and checkpoints scale from
    # max_iterations to that length. None: every cycle trains max_iterations.
    epochs: float | None = None
    min_iterations: int = 100
    # The backbone's pretrained stages learn at this multiple of lr (fine-tuning: keep the pretrained features
    # while the fresh head and extra layers learn at lr); 1 = one rate for all.
    backbone_lr_mult: float = 1.0

    def __post_init__(self):
        for name in ("max_iterations", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"train.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise ValueError(f"train.lr_steps must be increasing, got {list(self.lr_steps)}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"train.epochs must be > 0 (or null for max_iterations per cycle), got {self.epochs}")
        if not 0.0 <= self.jitter < 0.5:
            raise ValueError(f"train.jitter must be in [0, 0.5) (0 = off, 0.2 = mild), got {self.jitter}")
        if not 0.0 <= self.backbone_lr_mult <= 1.0:
            raise ValueError(
                f"train.backbone_lr_mult must be in [0, 1] (1 = one rate for all), got {self.backbone_lr_mult}"
            )
        if self.min_iterations < 1:
            raise ValueError(f"train.min_iterations must be >= 1, got {self.min_iterations}")
        if self.read_every < 1:
            raise ValueError(f"train.read_every must be >= 1, got {self.read_every}")
        if self.data_workers is not None and self.data_workers < 0:
            raise ValueError(f"train.data_workers must be >= 0 or null (automatic), got {self.data_workers}")
        LossConfig(cls_loss=self.cls_loss)

    def for_images(self, num_images: int) -> TrainRecipe:
        """The recipe of a cycle that trains on ``num_images`` labelled images: with ``epochs`` set, its
        length grows with the labelled set and the schedule (lr steps, warm-up, checkpoints) is stretched
        from ``max_iterations`` to it; without, this recipe unchanged."""
        if self.epochs is None:
            return self
        wanted = math.ceil(self.epochs * num_images / self.batch_size)
        iterations = max(min(wanted, self.max_iterations), min(self.min_iterations, self.max_iterations))
        scale = iterations / self.max_iterations
        return replace(
            self,
            max_iterations=iterations,
            lr_steps=tuple(max(1, round(step * scale)) for step in self.lr_steps),
            warmup_iterations=max(1, round(self.warmup_iterations * scale)) if self.warmup_iterations else 0,
            checkpoint_every=max(1, round(self.checkpoint_every * scale)),
            epochs=None,
        )


def learning_rate(recipe: TrainRecipe, iteration: int) -> float:
    """Step schedule with the polynomial warm-up; ``iteration`` counts from 0."""
    lr = recipe.lr * recipe.lr_gamma ** sum(iteration >= step for step in recipe.lr_steps)
    if iteration < recipe.warmup_iterations:
        lr *= ((iteration + 1) / recipe.warmup_iterations) ** recipe.warmup_power
    return lr


class WorkerContext(Protocol):
    """What the loop needs from its surroundings (Ray Train, or a single local process)."""

    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: nn.Module) -> nn.Module: ...
    def latest_checkpoint(self) -> dict | None: ...
    def report(self, metrics: dict[str, Any], state: dict | None) -> None: ...
    def all_max(self, value: float) -> float: ...
    def all_gather(self, value: float) -> list[float]: ...


@dataclass
class LocalContext:
    """A one-process context: checkpoints kept in memory, reports appended to ``reports``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoint: dict | None = None
    reports: list[dict] = field(default_factory=list)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def latest_checkpoint(self) -> dict | None:
        return self.checkpoint

    def report(self, metrics: dict[str, Any], state: dict | None) -> None:
        self.reports.append(metrics)
        if state is not None:
            self.checkpoint = copy.deepcopy(state)

    def all_max(self, value: float) -> float:
        return value

    def all_gather(self, value: float) -> list[float]:
        return [value]


class TrainingDiverged(FloatingPointError):
    """The loss diverged again after restarting from the last good checkpoint and from scratch."""


def _fresh(spec: ModelSpec, init_weights: dict | None, backbone: dict | None, seed: int, device):
    """A new model: the warm-start weights when given, else the backbone's pretrained tensors (or none)."""
    torch.manual_seed(seed)
    model = spec.build(backbone=None if init_weights is not None else backbone)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    return engine.prepare_for_device(model, device)


def _optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    """One parameter group per learning-rate multiple: the backbone's pretrained stages (``backbone.features``)
    at ``backbone_lr_mult``, the rest at 1. Each group's ``lr_mult`` scales the scheduled rate."""
    core = model.module if hasattr(model, "module") else model  # DDP wraps the model
    backbone = {id(p) for p in core.backbone.features.parameters()} if recipe.backbone_lr_mult != 1.0 else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in backbone], "lr_mult": 1.0},
        {"params": [p for p in trainable if id(p) in backbone], "lr_mult": recipe.backbone_lr_mult},
    ]
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr)
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def _checksum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()).item())


def _mix(*values: int) -> int:
    """A seed from several integers (stable across processes and runs)."""
    seed = 0x9E3779B1
    for value in values:
        seed = (seed * 1_000_003 + int(value) + 1) % (2**63 - 1)
    return seed


class _Seeded(Dataset):
    """Seeds torch before each sample so that its augmentation depends only on (seed, epoch, index)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        torch.manual_seed(sample_seed)
        return self.dataset[index]


class _BatchOrder(Sampler):
    """This rank's batches from ``start_iteration`` on, forever: epoch e is a permutation seeded by (seed, e),
    dealt to ranks in turn; each index carries its own augmentation seed. Resuming at iteration i yields
    exactly the batches an uninterrupted run would have seen from i."""

    def __init__(self, size: int, per_rank: int, world_size: int, rank: int, seed: int, start_iteration: int):
        self.size, self.per_rank, self.world_size, self.rank = size, per_rank, world_size, rank
        self.seed, self.start = seed, start_iteration
        self.per_epoch = (size // world_size) // per_rank

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start
        while True:
            epoch, position = divmod(iteration, self.per_epoch)
            generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
            mine = torch.randperm(self.size, generator=generator)[self.rank :: self.world_size].tolist()
            for batch in range(position, self.per_epoch):
                indices = mine[batch * self.per_rank : (batch + 1) * self.per_rank]
                yield [(i, _mix(self.seed, epoch, i)) for i in indices]
                iteration += 1


def _first_divergence(rows: list[list[float]], history: list[float], factor: float) -> int | None:
    """Check a window of ``[total, loc, cls]`` rows in order: the index of the first whose loss is not finite or
    above ``factor`` times the recent median; each good loss before it joins ``history``."""
    for k, (loss, _, _) in enumerate(rows):
        exploding = len(history) >= 20 and loss > factor * statistics.median(history[-50:])
        if not math.isfinite(loss) or exploding:
            return k
        history.append(loss)
    return None


def loader_workers(device: torch.device) -> int:
    """Loader processes per training worker by default: none on CPU (they would compete with the model for
    the same cores), up to 4 beside a GPU (decoding and augmenting ahead of it)."""
    if device.type != "cuda":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def train_worker(
    *,
    spec: ModelSpec,
    dataset: Dataset,
    recipe: TrainRecipe,
    context: WorkerContext,
    init_weights: dict | None = None,
    backbone: dict | None = None,
    mixed_precision: bool = True,
    on_iteration: Callable[[int], None] | None = None,
) -> nn.Module:
    """Train on ``dataset`` until ``recipe.max_iterations``, resuming from the context's latest checkpoint.

    Every ``checkpoint_every`` iterations (and at the end) every rank calls ``context.report``; rank 0 passes
    the state ``{"model", "optimizer", "iteration", "restarts"}``. Metrics: ``iteration``, ``loss``,
    ``loc``, ``cls`` (means since the last report), ``lr``, ``start_iteration`` (where this attempt began),
    ``initial_loss`` (its first iteration's loss), ``images_per_s`` (since the last report, all ranks), ``restarts`` and
    ``weight_spread`` (max - min over ranks of a parameter checksum; 0 when replicas are in sync).

    ``backbone`` is the ImageNet ``state_dict`` (read once by the caller) for a model trained from scratch;
    ``init_weights`` (a warm start) or a checkpoint replace it. ``mixed_precision``: bf16 autocast on CUDA.

    Divergence guard: a non-finite loss, or one above ``divergence_factor`` times the recent median, on any
    rank restarts every rank from the last good checkpoint (``max_restarts`` times), then once from scratch;
    a further divergence raises :class:`TrainingDiverged`.
    """
    per_rank = recipe.batch_size // context.world_size
    if per_rank < 1:
        raise ValueError(f"train.batch_size {recipe.batch_size} is smaller than the {context.world_size} workers")
    model = _fresh(spec, init_weights, backbone, recipe.seed, context.device)
    bf16 = engine.use_bf16(context.device, mixed_precision)
    net = context.wrap(model)
    optimizer = _optimizer(model, recipe)
    loss_fn = MultiboxMixtureLoss(LossConfig(cls_loss=recipe.cls_loss), check_targets=False)  # checked on the host
    iteration, restarts, from_scratch = 0, 0, False
    checkpoint = context.latest_checkpoint()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        iteration, restarts = int(checkpoint["iteration"]), int(checkpoint.get("restarts", 0))
        logger.info("rank %d: resumed from the checkpoint at iteration %d", context.rank, iteration)
    good = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration})
    start_iteration = iteration
    batches_per_epoch = (len(dataset) // context.world_size) // per_rank
    if batches_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images give no batch of {per_rank} per worker")

    on_gpu = context.device.type == "cuda"
    workers = recipe.data_workers if recipe.data_workers is not None else loader_workers(context.device)

    def loader_from(start: int) -> Iterator:
        order = _BatchOrder(
            len(dataset), per_rank, context.world_size, context.rank, recipe.seed + 1000 * restarts, start
        )
        loader = DataLoader(
            _Seeded(dataset),
            batch_sampler=order,
            collate_fn=engine.collate,
            num_workers=workers,
            pin_memory=on_gpu,
            prefetch_factor=4 if workers else None,
        )
        return iter(loader)

    history: list[float] = []
    window: dict[str, list[float]] = {"loss": [], "loc": [], "cls": []}
    initial_loss: float | None = None
    window_start = time.perf_counter()
    if iteration >= recipe.max_iterations:  # a finished run started again: hand back its final state
        spread = context.all_gather(_checksum(model))
        context.report(
            {
                "iteration": iteration,
                "start_iteration": start_iteration,
                "restarts": restarts,
                "weight_spread": max(spread) - min(spread),
            },
            {**checkpoint, "restarts": restarts} if context.rank == 0 else None,
        )
    while iteration < recipe.max_iterations:
        diverged = False
        batches = loader_from(iteration)
        pending: list[torch.Tensor] = []  # [total, loc, cls] per iteration since the last read, on the device
        while iteration < recipe.max_iterations:
            images, targets = next(batches)
            check_labels(targets, model.num_classes)  # on the host, before the upload
            torch.manual_seed(_mix(recipe.seed, restarts, iteration))  # jitter and the loss's noise, per iteration
            images, targets = batch_jitter(images, targets, recipe.jitter)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, iteration) * group.get("lr_mult", 1.0)
            batch = (
                images.to(context.device, non_blocking=True),
                [{k: v.to(context.device, non_blocking=True) for k, v in t.items()} for t in targets],
            )
            terms = engine.train_step(net, batch, optimizer, loss_fn, grad_clip=recipe.grad_clip, bf16=bf16)
            pending.append(torch.stack([terms.total, terms.loc, terms.cls]))
            iteration += 1
            at_checkpoint = iteration % recipe.checkpoint_every == 0 or iteration == recipe.max_iterations
            if len(pending) >= recipe.read_every or at_checkpoint:
                # One host read for the window's losses; one collective for every rank's verdict.
                first, rows = iteration - len(pending), torch.stack(pending).tolist()
                bad = _first_divergence(rows, history, recipe.divergence_factor)
                pending = []
                if context.all_max(0.0 if bad is None else 1.0) > 0:
                    # The window's later steps are discarded with it: the restart reloads a checkpoint.
                    iteration = first + (bad if bad is not None else 0)
                    diverged = True
                    break
                for loss, loc, cls in rows:
                    initial_loss = loss if initial_loss is None else initial_loss
                    for key, value in (("loss", loss), ("loc", loc), ("cls", cls)):
                        window[key].append(value)
            if on_iteration is not None:
                on_iteration(iteration)
            if at_checkpoint:
                if iteration == recipe.max_iterations and recipe.precise_bn_batches:
                    engine.recalibrate_batch_norm(
                        model,
                        (next(batches) for _ in range(recipe.precise_bn_batches)),
                        num_batches=recipe.precise_bn_batches,
                        device=context.device,
                    )
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "iteration": iteration,
                    "restarts": restarts,
                }
                spread = context.all_gather(_checksum(model))
                metrics = {
                    "iteration": iteration,
                    "lr": learning_rate(recipe, iteration - 1),
                    "start_iteration": start_iteration,
                    "restarts": restarts,
                    "initial_loss": initial_loss,
                    "weight_spread": max(spread) - min(spread),
                    "images_per_s": len(window["loss"]) * recipe.batch_size / (time.perf_counter() - window_start),
                    **{k: float(sum(v) / len(v)) for k, v in window.items()},
                }
                context.report(metrics, state if context.rank == 0 else None)
                good = copy.deepcopy(state)
                window = {k: [] for k in window}
                window_start = time.perf_counter()
        if not diverged:
            continue
        restarts += 1
        history.clear()
        if restarts <= recipe.max_restarts:
            logger.warning(
                "rank %d: loss diverged at iteration %d; restarting from the checkpoint at iteration %d "
                "(restart %d of %d)",
                context.rank,
                iteration,
                good["iteration"],
                restarts,
                recipe.max_restarts,
            )
            model.load_state_dict(good["model"])
            optimizer.load_state_dict(good["optimizer"])
            iteration = int(good["iteration"])
        elif not from_scratch:
            from_scratch = True
            logger.warning(
                "rank %d: loss diverged again at iteration %d; restarting from scratch", context.rank, iteration
            )
            model.load_state_dict(_fresh(spec, init_weights, backbone, recipe.seed + restarts, "cpu").state_dict())
            optimizer = _optimizer(model, recipe)
            iteration = 0
        else:
            raise TrainingDiverged(
                f"training diverged at iteration {iteration} even after restarting from the "
                f"last checkpoint and from scratch; lower train.lr (now {recipe.lr}) or set "
                "train.grad_clip"
            )
    return model
