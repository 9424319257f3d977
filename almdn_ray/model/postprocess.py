"""From mixture outputs to per-image detections that carry AL-MDN's four uncertainties."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, clip_boxes_to_image, nms

from almdn_ray import mdn
from almdn_ray.model.gmm_head import MixtureOutputs

__all__ = [
    "PostprocessConfig", "Detections", "BatchDetections", "postprocess", "postprocess_batch", "postprocess_reference",
    "detect_batch", "image_summaries", "rows_per_image", "CommitteeDetections", "BatchCommittee", "committee",
    "committee_batch",
]  # fmt: skip


@dataclass(frozen=True)
class PostprocessConfig:
    """Detection settings; defaults are the paper's scoring settings.

    Candidates are anchors whose class probability is ``> score_threshold``; NMS at ``nms_iou`` per class
    keeps at most ``max_per_class``; detections with confidence ``< min_confidence`` are dropped (set it to
    0 for mAP evaluation, which wants the low-confidence tail). ``pre_nms_top_k`` optionally keeps only the
    highest-scoring candidates of each class before NMS (a speed-up for evaluation; None is exact).
    """

    score_threshold: float = 0.01
    nms_iou: float = 0.45
    max_per_class: int = 200
    min_confidence: float = 0.5
    pre_nms_top_k: int | None = None

    def __post_init__(self):
        for name in ("score_threshold", "nms_iou", "min_confidence"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PostprocessConfig.{name} must be in [0, 1], got {value}")
        if self.max_per_class < 1:
            raise ValueError(f"PostprocessConfig.max_per_class must be >= 1, got {self.max_per_class}")
        if self.pre_nms_top_k is not None and self.pre_nms_top_k < 1:
            raise ValueError(f"PostprocessConfig.pre_nms_top_k must be >= 1 or None, got {self.pre_nms_top_k}")


class Detections(NamedTuple):
    """Detections of one image, sorted by score (highest first). Every field has D rows.

    ``boxes [D, 4]`` xyxy in input pixels, ``scores [D]``, ``labels [D]`` (1..C-1); ``loc_al``/``loc_ep``
    the box aleatoric/epistemic uncertainty (max over 4 coordinates), ``cls_al``/``cls_ep`` the class ones at
    the detected class, ``entropy`` of the class distribution (background included).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    loc_al: Tensor
    loc_ep: Tensor
    cls_al: Tensor
    cls_ep: Tensor
    entropy: Tensor


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp(min=1e-12).log()).sum(dim=-1)


def _rank_in_group(groups: Tensor, num_groups: int) -> Tensor:
    """0-based rank of each entry among the entries of its group, for a list already sorted by score.

    ``groups [N]`` in ``[0, num_groups)``; no host sync (the group counts have a size known on the host)."""
    order = torch.argsort(groups, stable=True)  # groups entries, keeps score order inside a group
    counts = rows_per_image(groups, num_groups)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(groups)
    rank[order] = torch.arange(groups.numel(), device=groups.device) - starts[groups[order]]
    return rank


# Candidates per NMS call: above this, the batch's candidates are cut at group boundaries into calls of about
# this size. One call with coordinate offsets compares every kept box with every later candidate, so its
# arithmetic grows with the square of the call's size; torchvision's batched_nms switches to one call per class
# at the same sizes (4,000 coordinates on CPU, 100,000 on CUDA).
NMS_CHUNK = {"cpu": 1_000, "cuda": 25_000}


def _grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou: float, num_groups: int, span: float) -> Tensor:
    """Greedy NMS inside each group, for all groups of a batch at once.

    Args: ``boxes [N, 4]`` xyxy within ``[0, span)``, ``scores [N]``, ``groups [N]`` in ``[0, num_groups)``.
    Returns: indices of the kept entries, by score (highest first; ties in input order).
    """
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    # Each group moved to its own square; float64 keeps the offset coordinates exact to ~1e-9 pixel.
    shifted = boxes.double() + (groups.double() * span)[:, None]
    limit = NMS_CHUNK.get(boxes.device.type, NMS_CHUNK["cuda"])
    if scores.numel() <= limit:
        kept = nms(shifted, scores.double(), iou)
    else:
        order = torch.argsort(groups, stable=True)
        counts = rows_per_image(groups, num_groups)
        parts, start, size = [], 0, 0
        for count in counts.tolist() + [limit]:  # one host copy; the sentinel closes the last call
            if size and size + count > limit:
                chunk = order[start : start + size]
                parts.append(chunk[nms(shifted[chunk], scores[chunk].double(), iou)])
                start, size = start + size, 0
            size += count
        kept = torch.cat(parts)
    kept = kept.sort().values  # ties in input order, then by score
    return kept[scores[kept].argsort(descending=True, stable=True)]


def detect_batch(
    boxes_of: Callable[[Tensor, Tensor], Tensor],
    probs: Tensor,
    image_size: tuple[int, int],
    config: PostprocessConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Candidates, optional per-class top-k and per-class NMS for a whole batch, on its device.

    Args: ``probs [B, A, C]`` class probabilities (background first); ``boxes_of(image [N], anchor [N])``
    gives those anchors' decoded, clipped boxes ``[N, 4]`` (only the candidates are decoded).
    Returns: ``(image, anchor, labels, scores, boxes)``, each ``[M]`` (boxes ``[M, 4]``): the kept detections
    of every image, sorted by image, then by score (highest first; ties in anchor, then class order).
    """
    batch, _, num_classes = probs.shape
    foreground = probs[..., 1:]  # [B, A, C-1]
    # A box below min_confidence can only suppress lower-scored boxes, so filtering before NMS is exact.
    keep = (foreground > config.score_threshold) & (foreground >= config.min_confidence)
    image, anchor, class_idx = keep.nonzero(as_tuple=True)  # the batch's one unavoidable size sync
    labels = class_idx + 1
    scores = foreground[image, anchor, class_idx]
    groups = image * num_classes + labels  # one NMS group per (image, class)
    num_groups = batch * num_classes
    if config.pre_nms_top_k is not None:
        order = scores.argsort(descending=True, stable=True)
        order = order[_rank_in_group(groups[order], num_groups) < config.pre_nms_top_k]
        image, anchor, labels, scores, groups = image[order], anchor[order], labels[order], scores[order], groups[order]
    span = float(max(image_size)) + 1.0  # boxes are clipped to the image
    boxes = boxes_of(image, anchor)  # [N, 4]
    kept = _grouped_nms(boxes, scores, groups, config.nms_iou, num_groups, span)
    kept = kept[_rank_in_group(groups[kept], num_groups) < config.max_per_class]
    kept = kept[torch.argsort(image[kept], stable=True)]  # by image, score order kept inside
    return image[kept], anchor[kept], labels[kept], scores[kept], boxes[kept]


class BatchDetections(NamedTuple):
    """Detections of a batch of images as flat rows on the batch's device, sorted by image, then by score
    (highest first). ``image [M]`` is each row's image in the batch; the other fields are those of
    :class:`Detections`, ``[M, 4]`` or ``[M]``."""

    image: Tensor
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    loc_al: Tensor
    loc_ep: Tensor
    cls_al: Tensor
    cls_ep: Tensor
    entropy: Tensor

    def split(self, num_images: int) -> list[Detections]:
        """Per-image :class:`Detections` on the CPU (one host copy of the counts)."""
        return [Detections(*parts) for parts in _split_rows(self, num_images)]


def rows_per_image(image: Tensor, num_images: int) -> Tensor:
    """``[num_images]`` how many of the rows ``image [M]`` belong to each image (no host sync, unlike
    ``bincount`` on CUDA)."""
    counts = torch.zeros(num_images, dtype=torch.long, device=image.device)
    return counts.index_add_(0, image, torch.ones_like(image))


def _split_rows(rows: tuple[Tensor, ...], num_images: int):
    """Per image, the fields after ``rows[0]`` (the image of each row, sorted) on the CPU."""
    sizes = rows_per_image(rows[0], num_images).tolist()
    return zip(*(t.cpu().split(sizes) for t in rows[1:]))


def postprocess_batch(
    outputs: MixtureOutputs,
    *,
    box_coder: BoxCoder,
    image_size: tuple[int, int],
    config: PostprocessConfig = PostprocessConfig(),
) -> BatchDetections:
    """Decode the mixture means, run per-class NMS and attach the uncertainties, for the whole batch at once
    on its device (no loop over images; a fixed handful of host syncs whatever the batch size).

    Args:
        outputs: a batch of B images' head outputs.
        box_coder: the encoding the model was trained with.
        image_size: ``(H, W)`` of the input, for clipping.
    """
    o = outputs
    pi = torch.softmax(o.cls_pi_logit, dim=-1).unsqueeze(-1)  # [B, A, K, 1]
    probs = (pi * torch.softmax(o.cls_logits, dim=-1)).sum(dim=-2)  # [B, A, C]: the mixture's mean, as mdn's

    def boxes_of(image: Tensor, anchor: Tensor) -> Tensor:
        mean, _, _ = mdn.localization_moments(
            o.loc_mu[image, anchor], o.loc_sigma_logit[image, anchor], o.loc_pi_logit[image, anchor]
        )
        return clip_boxes_to_image(box_coder.decode_single(mean, o.anchors[anchor]), image_size)

    image, anchor, labels, scores, boxes = detect_batch(boxes_of, probs, image_size, config)
    # The uncertainties of the detections alone (the same arithmetic per anchor as over the whole batch).
    _, loc_al, loc_ep = mdn.localization_moments(
        o.loc_mu[image, anchor], o.loc_sigma_logit[image, anchor], o.loc_pi_logit[image, anchor]
    )  # [M, 4]
    p, cls_al, cls_ep = mdn.classification_moments(
        o.cls_logits[image, anchor], o.cls_sigma_logit[image, anchor], o.cls_pi_logit[image, anchor]
    )  # [M, C]
    rows = torch.arange(labels.numel(), device=labels.device)
    return BatchDetections(
        image=image,
        boxes=boxes,
        scores=scores,
        labels=labels,
        loc_al=loc_al.amax(dim=-1),
        loc_ep=loc_ep.amax(dim=-1),
        cls_al=cls_al[rows, labels],
        cls_ep=cls_ep[rows, labels],
        entropy=_entropy(p),
    )


def postprocess(
    outputs: MixtureOutputs,
    *,
    box_coder: BoxCoder,
    image_size: tuple[int, int],
    config: PostprocessConfig = PostprocessConfig(),
) -> list[Detections]:
    """:func:`postprocess_batch`, split per image: B :class:`Detections` on the CPU."""
    found = postprocess_batch(outputs, box_coder=box_coder, image_size=image_size, config=config)
    return found.split(outputs.loc_mu.shape[0])


def image_summaries(image: Tensor, values: Tensor, num_images: int, names: Sequence[str]) -> dict[str, Tensor]:
    """Per-image ``{name}_max`` (``-inf`` without rows), ``_sum`` and ``_sumsq`` of each column, on the rows'
    device in float64: :func:`almdn_ray.acquisition.summarize` for rows that never leave the device.

    Args: ``image [M]`` in ``[0, num_images)``, ``values [M, T]``, ``names`` T column names.
    """
    values = values.double()
    out = {}
    for j, name in enumerate(names):
        column = values[:, j]
        maxima = torch.full((num_images,), -math.inf, dtype=torch.float64, device=values.device)
        out[f"{name}_max"] = maxima.scatter_reduce(0, image, column, reduce="amax")
        zeros = torch.zeros(num_images, dtype=torch.float64, device=values.device)
        out[f"{name}_sum"] = zeros.index_add(0, image, column)
        out[f"{name}_sumsq"] = zeros.index_add(0, image, column * column)
    return out


def postprocess_reference(
    outputs: MixtureOutputs,
    *,
    box_coder: BoxCoder,
    image_size: tuple[int, int],
    config: PostprocessConfig = PostprocessConfig(),
) -> list[Detections]:
    """The per-image form of :func:`postprocess` (a Python loop over the images, torchvision's
    ``batched_nms`` per image): the definition the batched path is tested and benchmarked against."""
    loc_mean, loc_al, loc_ep = mdn.localization_moments(outputs.loc_mu, outputs.loc_sigma_logit, outputs.loc_pi_logit)
    probs, cls_al, cls_ep = mdn.classification_moments(
        outputs.cls_logits, outputs.cls_sigma_logit, outputs.cls_pi_logit
    )
    loc_al_max, loc_ep_max = loc_al.amax(dim=-1), loc_ep.amax(dim=-1)  # [B, A]
    num_classes = probs.shape[-1]
    results = []
    for i in range(probs.shape[0]):
        boxes = clip_boxes_to_image(box_coder.decode_single(loc_mean[i], outputs.anchors), image_size)
        foreground = probs[i, :, 1:]
        keep = (foreground > config.score_threshold) & (foreground >= config.min_confidence)
        anchor_idx, class_idx = keep.nonzero(as_tuple=True)
        labels, scores = class_idx + 1, foreground[anchor_idx, class_idx]
        if config.pre_nms_top_k is not None:
            order = scores.argsort(descending=True, stable=True)
            order = order[_rank_in_group(labels[order], num_classes) < config.pre_nms_top_k]
            anchor_idx, labels, scores = anchor_idx[order], labels[order], scores[order]
        kept = batched_nms(boxes[anchor_idx], scores, labels, config.nms_iou)
        kept = kept[_rank_in_group(labels[kept], num_classes) < config.max_per_class]
        anchor_idx, labels, scores = anchor_idx[kept], labels[kept], scores[kept]
        results.append(
            Detections(
                boxes=boxes[anchor_idx],
                scores=scores,
                labels=labels,
                loc_al=loc_al_max[i, anchor_idx],
                loc_ep=loc_ep_max[i, anchor_idx],
                cls_al=cls_al[i, anchor_idx, labels],
                cls_ep=cls_ep[i, anchor_idx, labels],
                entropy=_entropy(probs[i, anchor_idx]),
            )
        )
    return results


class CommitteeDetections(NamedTuple):
    """Detections of one image from several predictions of it (MC-dropout passes or ensemble members).

    The detections come from the committee's mean class probabilities and mean box; ``cls_mi`` is the
    mutual information of the class distribution at the detection's anchor (entropy of the mean minus the
    mean entropy: what the members disagree on), ``loc_var`` the variance across members of the encoded box
    mean, max over the 4 coordinates (the spread of where the members put the box).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    cls_mi: Tensor
    loc_var: Tensor


class BatchCommittee(NamedTuple):
    """:class:`CommitteeDetections` of a batch as flat rows (``image [M]`` first), as :class:`BatchDetections`."""

    image: Tensor
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    cls_mi: Tensor
    loc_var: Tensor

    def split(self, num_images: int) -> list[CommitteeDetections]:
        """Per-image :class:`CommitteeDetections` on the CPU (one host copy of the counts)."""
        return [CommitteeDetections(*parts) for parts in _split_rows(self, num_images)]


def committee(
    members: Sequence[MixtureOutputs],
    *,
    box_coder: BoxCoder,
    image_size: tuple[int, int],
    config: PostprocessConfig = PostprocessConfig(),
) -> list[CommitteeDetections]:
    """:func:`committee_batch`, split per image (on the CPU)."""
    found = committee_batch(members, box_coder=box_coder, image_size=image_size, config=config)
    return found.split(members[0].loc_mu.shape[0])


def committee_batch(
    members: Sequence[MixtureOutputs],
    *,
    box_coder: BoxCoder,
    image_size: tuple[int, int],
    config: PostprocessConfig = PostprocessConfig(),
) -> BatchCommittee:
    """Detections and their disagreement from T >= 2 predictions of the same batch (same anchors), for the
    whole batch at once (flat rows, as :func:`postprocess_batch`).

    Each member's class distribution is its mixture's mean (DESIGN section 2); the anchors are shared, so
    anchor ``a`` of every member predicts the same default box and disagreement is measured per anchor.
    """
    if len(members) < 2:
        raise ValueError(f"a committee needs at least 2 predictions, got {len(members)}")
    probs, loc_means = [], []
    for outputs in members:
        loc_mean, _, _ = mdn.localization_moments(outputs.loc_mu, outputs.loc_sigma_logit, outputs.loc_pi_logit)
        p, _, _ = mdn.classification_moments(outputs.cls_logits, outputs.cls_sigma_logit, outputs.cls_pi_logit)
        probs.append(p)
        loc_means.append(loc_mean)
    # float64: near-agreeing members differ in the 7th digit, where float32 entropies cancel to noise
    probs_t, loc_t = torch.stack(probs).double(), torch.stack(loc_means).double()  # [T, B, A, C], [T, B, A, 4]
    mean_probs, mean_loc = probs_t.mean(dim=0), loc_t.mean(dim=0)
    mutual_information = (_entropy(mean_probs) - _entropy(probs_t).mean(dim=0)).clamp(min=0.0)  # [B, A]
    loc_variance = loc_t.var(dim=0, unbiased=False).amax(dim=-1)  # [B, A]
    anchors = members[0].anchors

    def boxes_of(image: Tensor, anchor: Tensor) -> Tensor:
        return clip_boxes_to_image(box_coder.decode_single(mean_loc[image, anchor], anchors[anchor]), image_size)

    image, anchor, labels, scores, boxes = detect_batch(boxes_of, mean_probs, image_size, config)
    return BatchCommittee(
        image=image,
        boxes=boxes.float(),
        scores=scores.float(),
        labels=labels,
        cls_mi=mutual_information[image, anchor].float(),
        loc_var=loc_variance[image, anchor].float(),
    )
