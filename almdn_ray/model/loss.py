"""The multibox mixture loss: SSD matching and hard negative mining around the AL-MDN mixture losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import SSDMatcher
from torchvision.ops import box_iou

from almdn_ray import mdn
from almdn_ray.model.anchors import make_box_coder
from almdn_ray.model.gmm_head import MixtureOutputs

__all__ = ["LossConfig", "LossTerms", "MultiboxMixtureLoss", "match_anchors"]


@dataclass(frozen=True)
class LossConfig:
    """Loss settings; defaults are the paper's."""

    iou_threshold: float = 0.5
    neg_pos_ratio: float = 3.0
    cls_loss: str = "type1"  # "type1" | "type2"
    variances: tuple[float, float] = (0.1, 0.2)
    sigma_offset: float = 0.3
    nll_scale: float = 2.0
    eps: float = 1e-9

    def __post_init__(self):
        if self.cls_loss not in ("type1", "type2"):
            raise ValueError(f"cls_loss must be 'type1' or 'type2', got {self.cls_loss!r}")
        if not 0.0 < self.iou_threshold < 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1), got {self.iou_threshold}")
        if self.neg_pos_ratio < 0:
            raise ValueError(f"neg_pos_ratio must be >= 0, got {self.neg_pos_ratio}")


class LossTerms(NamedTuple):
    """Both terms are already divided by the number of positives; ``total = loc + cls``."""

    total: Tensor
    loc: Tensor
    cls: Tensor
    num_positives: int


def match_anchors(anchors: Tensor, boxes: Tensor, labels: Tensor, matcher: SSDMatcher) -> tuple[Tensor, Tensor]:
    """Assign every anchor a ground truth (IoU >= threshold, plus the best anchor of every ground truth).

    Args:
        anchors: ``[A, 4]``; boxes: ``[G, 4]`` xyxy; labels: ``[G]`` in 1..C-1.

    Returns:
        ``(anchor_labels [A], matched_boxes [A, 4])``; label 0 marks background (its box is meaningless).
    """
    if boxes.numel() == 0:
        return torch.zeros(anchors.shape[0], dtype=torch.long, device=anchors.device), torch.zeros_like(anchors)
    matched = matcher(box_iou(boxes, anchors))  # [A], -1 = below threshold
    index = matched.clamp(min=0)
    anchor_labels = torch.where(matched >= 0, labels[index].long(), torch.zeros_like(index))
    return anchor_labels, boxes[index]


class MultiboxMixtureLoss:
    """Computes :class:`LossTerms` from :class:`MixtureOutputs` and per-image targets."""

    def __init__(self, config: LossConfig = LossConfig()):
        self.config = config
        self.box_coder = make_box_coder(config.variances)
        self.matcher = SSDMatcher(config.iou_threshold)

    def __call__(
        self, outputs: MixtureOutputs, targets: list[dict[str, Tensor]], noise: Tensor | None = None
    ) -> LossTerms:
        """Args:
        outputs: head outputs of a batch of B images.
        targets: B dicts with ``boxes [G, 4]`` xyxy in input pixels and ``labels [G]`` (1..C-1); G may be 0.
        noise: ``[B, A, K, C]`` for the Type-1/2 sampling; drawn when None.
        """
        cfg = self.config
        anchors = outputs.anchors
        num_classes = outputs.cls_logits.shape[-1]
        if len(targets) != outputs.loc_mu.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {outputs.loc_mu.shape[0]} images")
        labels, encoded = [], []
        for i, target in enumerate(targets):
            boxes, gt_labels = target["boxes"].to(anchors), target["labels"].to(anchors.device)
            if gt_labels.numel() and (gt_labels.min() < 1 or gt_labels.max() >= num_classes):
                raise ValueError(
                    f"target {i}: labels must be in 1..{num_classes - 1} (0 is background), got {gt_labels.tolist()}"
                )
            anchor_labels, matched_boxes = match_anchors(anchors, boxes, gt_labels, self.matcher)
            labels.append(anchor_labels)
            encoded.append(self.box_coder.encode_single(matched_boxes, anchors))
        labels = torch.stack(labels)  # [B, A]
        encoded = torch.stack(encoded)  # [B, A, 4]
        positive = labels > 0
        num_positives = int(positive.sum())
        normaliser = max(num_positives, 1)

        loc = mdn.localization_nll(
            encoded[positive],
            outputs.loc_mu[positive],
            outputs.loc_sigma_logit[positive],
            outputs.loc_pi_logit[positive],
            sigma_offset=cfg.sigma_offset,
            nll_scale=cfg.nll_scale,
            eps=cfg.eps,
        ).sum()
        cls_per_anchor = mdn.classification_loss(
            outputs.cls_logits, outputs.cls_sigma_logit, outputs.cls_pi_logit, labels, noise, cfg.cls_loss, eps=cfg.eps
        )  # [B, A]
        chosen = positive | self._hard_negatives(cls_per_anchor.detach(), positive)
        cls = cls_per_anchor[chosen].sum()
        return LossTerms(
            total=(loc + cls) / normaliser, loc=loc / normaliser, cls=cls / normaliser, num_positives=num_positives
        )

    def _hard_negatives(self, cls_loss: Tensor, positive: Tensor) -> Tensor:
        """The ``neg_pos_ratio × positives`` highest-loss background anchors of each image. ``[B, A]`` bool."""
        num_negatives = (self.config.neg_pos_ratio * positive.sum(dim=1)).long()  # [B]
        negative_loss = cls_loss.masked_fill(positive, float("-inf"))
        order = negative_loss.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)  # rank of each anchor by loss, 0 = hardest
        return (rank < num_negatives.unsqueeze(1)) & ~positive
