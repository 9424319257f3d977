"""One training step, BatchNorm recalibration and inference for SSD-GMM, with no Ray. The one training loop
is :func:`almdn_ray.training.train_worker` (local or on Ray Train workers)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from almdn_ray.model.anchors import make_box_coder
from almdn_ray.model.detector import SSDGMM
from almdn_ray.model.embeddings import Embedder
from almdn_ray.model.gmm_head import MixtureOutputs, enable_dropout
from almdn_ray.model.loss import LossTerms, MultiboxMixtureLoss
from almdn_ray.model.postprocess import (
    BatchCommittee,
    CommitteeDetections,
    Detections,
    PostprocessConfig,
    postprocess,
)
from almdn_ray.model.postprocess import committee_batch as _committee_rows

logger = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "collate",
    "use_bf16",
    "forward",
    "prepare_for_device",
    "train_step",
    "recalibrate_batch_norm",
    "predict",
    "predict_embedded",
    "predict_committee",
    "committee_batch",
]

Batch = tuple[Tensor, list[dict[str, Tensor]]]  # images [B, 3, H, W] in [0, 1], per-image targets


def collate(samples: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> Batch:
    """Stack ``(image [3, H, W], target)`` samples of equal size into a :data:`Batch`."""
    images, targets = zip(*samples)
    return torch.stack(images), list(targets)


def use_bf16(device: torch.device | str, mixed_precision: bool) -> bool:
    """bf16 autocast is used on CUDA when the job allows it (``resources.mixed_precision``); never on CPU,
    where it is slower (tests turn it on explicitly to compare selections)."""
    return mixed_precision and torch.device(device).type == "cuda"


def prepare_for_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move a model to ``device``; on CUDA in ``channels_last`` (faster convolutions with bf16 tensor cores)."""
    device = torch.device(device)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def forward(model: nn.Module, images: Tensor, *, bf16: bool = False, with_features: bool = False):
    """The model's raw outputs, under bf16 autocast when ``bf16``; the mixture statistics, losses and
    post-processing always run on float32 outputs. ``with_features``: ``(outputs, feature maps)``."""
    if images.is_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16):
        outputs, features = model.forward_with_features(images) if with_features else (model(images), None)
    outputs = MixtureOutputs(*(t.float() for t in outputs)) if bf16 else outputs
    return (outputs, features) if with_features else outputs


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    loss_fn: MultiboxMixtureLoss,
    *,
    grad_clip: float | None = None,
    bf16: bool = False,
) -> LossTerms:
    """One optimisation step (the forward pass under bf16 autocast when ``bf16``). Returns the loss terms
    (detached)."""
    images, targets = batch
    model.train()
    terms = loss_fn(forward(model, images, bf16=bf16), targets)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return LossTerms(terms.total.detach(), terms.loc.detach(), terms.cls.detach(), terms.num_positives)


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module,
    batches: Iterable[Batch | Tensor],
    *,
    num_batches: int = 20,
    device: torch.device | str | None = None,
) -> int:
    """Re-estimate BatchNorm running statistics as exact averages over ``num_batches`` training batches.

    BatchNorm's exponential running averages lag behind weights that still move fast (a short run, or a
    backbone trained from scratch); an eval-mode model then sees statistics of older weights. This pass
    (detectron2 calls it "precise BN") replaces them with the current weights' statistics.

    Returns:
        The number of batches used (0 when the model has no BatchNorm).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    device = torch.device(device) if device is not None else next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            images = batch[0] if isinstance(batch, tuple | list) else batch
            model(images.to(device))
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used


@torch.no_grad()
def predict(
    model: SSDGMM,
    images: Tensor | Iterable[Tensor],
    *,
    config: PostprocessConfig = PostprocessConfig(),
    batch_size: int = 8,
    device: torch.device | str | None = None,
    variances: tuple[float, float] = (0.1, 0.2),
    bf16: bool = False,
) -> list[Detections]:
    """Detections with uncertainties for every image, in input order, on the CPU.

    Args:
        images: ``[N, 3, H, W]`` in [0, 1], or an iterable of ``[B, 3, H, W]`` batches.
        batch_size: images per forward pass when ``images`` is one tensor.
        variances: the box encoding the model was trained with (``LossConfig.variances``).
        bf16: the forward pass under bf16 autocast (post-processing stays float32).
    """
    return _predict(model, images, config, batch_size, device, variances, bf16, None)[0]


@torch.no_grad()
def predict_embedded(
    model: SSDGMM,
    images: Tensor,
    embedder: Embedder,
    *,
    config: PostprocessConfig = PostprocessConfig(),
    batch_size: int = 8,
    variances: tuple[float, float] = (0.1, 0.2),
    bf16: bool = False,
) -> tuple[list[Detections], Tensor, list[Tensor]]:
    """As :func:`predict`, plus from the same pass each image's embedding ``[N, dims]`` and each detection's
    (``[D_i, dims]`` per image, in the detections' order), on the CPU."""
    return _predict(model, images, config, batch_size, None, variances, bf16, embedder)


def _predict(model, images, config, batch_size, device, variances, bf16, embedder):
    device = torch.device(device) if device is not None else next(model.parameters()).device
    box_coder = make_box_coder(variances)
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    model.eval()
    results: list[Detections] = []
    image_rows: list[Tensor] = []
    object_rows: list[Tensor] = []
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        if embedder is None:
            outputs = forward(model, batch, bf16=bf16)
        else:
            outputs, features = forward(model, batch, bf16=bf16, with_features=True)
        detections = postprocess(outputs, box_coder=box_coder, image_size=tuple(batch.shape[-2:]), config=config)
        if embedder is not None:
            image_rows.append(embedder.images(features).cpu())
            object_rows.extend(embedder.objects(features, [d.boxes for d in detections], batch.shape[-1]))
        results.extend(detections)  # on the CPU already
    if embedder is None:
        return results, None, []
    dims = embedder.dims
    return results, torch.cat(image_rows) if image_rows else torch.zeros(0, dims), object_rows


@torch.no_grad()
def predict_committee(
    models: Sequence[SSDGMM],
    images: Tensor,
    *,
    passes: int = 1,
    config: PostprocessConfig = PostprocessConfig(),
    variances: tuple[float, float] = (0.1, 0.2),
    bf16: bool = False,
) -> list[CommitteeDetections]:
    """Committee detections of one batch per image, on the CPU: :func:`committee_batch`, split."""
    found = committee_batch(models, images, passes=passes, config=config, variances=variances, bf16=bf16)
    return found.split(images.shape[0])


@torch.no_grad()
def committee_batch(
    models: Sequence[SSDGMM],
    images: Tensor,
    *,
    passes: int = 1,
    config: PostprocessConfig = PostprocessConfig(),
    variances: tuple[float, float] = (0.1, 0.2),
    bf16: bool = False,
) -> BatchCommittee:
    """Committee detections of one batch: every model, ``passes`` times each, on the first model's device
    (flat rows that stay there).

    An ensemble is several models with ``passes=1`` (eval mode); MC dropout is one model with ``passes=T``
    and its dropout layers on (BatchNorm stays in eval mode). The models are left in eval mode.
    """
    if len(models) * passes < 2:
        raise ValueError(f"a committee needs >= 2 predictions; got {len(models)} model(s) x {passes} pass(es)")
    device = next(models[0].parameters()).device
    images = images.to(device, non_blocking=True)
    members = []
    try:
        for model in models:
            model.eval()
            if passes > 1 and enable_dropout(model) == 0:
                raise ValueError("MC dropout needs dropout in the model: set model.dropout > 0 (e.g. 0.1) and retrain")
            members.extend(forward(model, images, bf16=bf16) for _ in range(passes))
    finally:
        for model in models:
            model.eval()
    return _committee_rows(
        members, box_coder=make_box_coder(variances), image_size=tuple(images.shape[-2:]), config=config
    )
