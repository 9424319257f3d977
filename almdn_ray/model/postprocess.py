"""From mixture outputs to per-image detections that carry AL-MDN's four uncertainties."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, clip_boxes_to_image

from almdn_ray import mdn
from almdn_ray.model.gmm_head import MixtureOutputs

__all__ = ["PostprocessConfig", "Detections", "postprocess", "CommitteeDetections", "committee"]


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


def _rank_in_class(labels: Tensor, num_classes: int) -> Tensor:
    """0-based rank of each entry among the entries of its label, for a list already sorted by score."""
    order = torch.argsort(labels, stable=True)  # groups labels, keeps score order inside a group
    counts = torch.bincount(labels, minlength=num_classes)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]]
    return rank


def _detect(boxes: Tensor, probs: Tensor, config: PostprocessConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates, optional per-class top-k, per-class NMS for one image.

    Args: ``boxes [A, 4]`` decoded, ``probs [A, C]`` class probabilities (background first).
    Returns: ``(anchor_idx, labels, scores)`` of the kept detections, sorted by score.
    """
    num_classes = probs.shape[-1]
    foreground = probs[:, 1:]  # [A, C-1]
    keep = (foreground > config.score_threshold) & (foreground >= config.min_confidence)
    anchor_idx, class_idx = keep.nonzero(as_tuple=True)
    labels = class_idx + 1
    scores = foreground[anchor_idx, class_idx]
    if config.pre_nms_top_k is not None:
        order = scores.argsort(descending=True, stable=True)
        order = order[_rank_in_class(labels[order], num_classes) < config.pre_nms_top_k]
        anchor_idx, labels, scores = anchor_idx[order], labels[order], scores[order]
    # A box below min_confidence can only suppress lower-scored boxes, so filtering before NMS is exact.
    kept = batched_nms(boxes[anchor_idx], scores, labels, config.nms_iou)  # sorted by score
    kept = kept[_rank_in_class(labels[kept], num_classes) < config.max_per_class]
    return anchor_idx[kept], labels[kept], scores[kept]


def postprocess(
    outputs: MixtureOutputs,
    *,
    box_coder: BoxCoder,
    image_size: tuple[int, int],
    config: PostprocessConfig = PostprocessConfig(),
) -> list[Detections]:
    """Decode the mixture means, run per-class NMS per image and attach the uncertainties.

    Args:
        outputs: a batch of B images' head outputs.
        box_coder: the encoding the model was trained with.
        image_size: ``(H, W)`` of the input, for clipping.

    Returns:
        B :class:`Detections`.
    """
    loc_mean, loc_al, loc_ep = mdn.localization_moments(outputs.loc_mu, outputs.loc_sigma_logit, outputs.loc_pi_logit)
    probs, cls_al, cls_ep = mdn.classification_moments(
        outputs.cls_logits, outputs.cls_sigma_logit, outputs.cls_pi_logit
    )  # each [B, A, C]
    loc_al_max, loc_ep_max = loc_al.amax(dim=-1), loc_ep.amax(dim=-1)  # [B, A]
    results = []
    for i in range(probs.shape[0]):
        boxes = clip_boxes_to_image(box_coder.decode_single(loc_mean[i], outputs.anchors), image_size)
        anchor_idx, labels, scores = _detect(boxes, probs[i], config)
        p = probs[i, anchor_idx]  # [D, C]
        results.append(
            Detections(
                boxes=boxes[anchor_idx],
                scores=scores,
                labels=labels,
                loc_al=loc_al_max[i, anchor_idx],
                loc_ep=loc_ep_max[i, anchor_idx],
                cls_al=cls_al[i, anchor_idx, labels],
                cls_ep=cls_ep[i, anchor_idx, labels],
                entropy=-(p * p.clamp(min=1e-12).log()).sum(dim=-1),
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


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp(min=1e-12).log()).sum(dim=-1)


def committee(
    members: Sequence[MixtureOutputs],
    *,
    box_coder: BoxCoder,
    image_size: tuple[int, int],
    config: PostprocessConfig = PostprocessConfig(),
) -> list[CommitteeDetections]:
    """Detections and their disagreement from T >= 2 predictions of the same batch (same anchors).

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
    results = []
    for i in range(mean_probs.shape[0]):
        boxes = clip_boxes_to_image(box_coder.decode_single(mean_loc[i], anchors), image_size)
        anchor_idx, labels, scores = _detect(boxes, mean_probs[i], config)
        results.append(
            CommitteeDetections(
                boxes=boxes[anchor_idx].float(),
                scores=scores.float(),
                labels=labels,
                cls_mi=mutual_information[i, anchor_idx].float(),
                loc_var=loc_variance[i, anchor_idx].float(),
            )
        )
    return results
