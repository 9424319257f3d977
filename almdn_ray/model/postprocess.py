"""From mixture outputs to per-image detections that carry AL-MDN's four uncertainties."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, clip_boxes_to_image

from almdn_ray import mdn
from almdn_ray.model.gmm_head import MixtureOutputs

__all__ = ["PostprocessConfig", "Detections", "postprocess"]


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
    num_classes = probs.shape[-1]
    results = []
    for i in range(probs.shape[0]):
        boxes = clip_boxes_to_image(box_coder.decode_single(loc_mean[i], outputs.anchors), image_size)
        foreground = probs[i, :, 1:]  # [A, C-1]
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
        anchor_idx, labels, scores = anchor_idx[kept], labels[kept], scores[kept]
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
