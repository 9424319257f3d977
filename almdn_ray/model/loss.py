"""The multibox mixture loss: SSD matching and hard negative mining around the AL-MDN mixture losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection._utils import SSDMatcher
from torchvision.ops import box_iou

from almdn_ray import mdn
from almdn_ray.model.anchors import make_box_coder
from almdn_ray.model.gmm_head import MixtureOutputs

__all__ = ["LossConfig", "LossTerms", "MultiboxMixtureLoss", "match_anchors", "match_anchors_batch", "check_labels"]


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
    """Both terms are already divided by the number of positives; ``total = loc + cls``. All are tensors on
    the outputs' device (reading one is a host sync: the training loop reads them every few iterations)."""

    total: Tensor
    loc: Tensor
    cls: Tensor
    num_positives: Tensor


def match_anchors(anchors: Tensor, boxes: Tensor, labels: Tensor, matcher: SSDMatcher) -> tuple[Tensor, Tensor]:
    """Assign every anchor a ground truth (IoU >= threshold, plus the best anchor of every ground truth).

    The per-image reference of :func:`match_anchors_batch` (torchvision's matcher on one image).

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


def _box_iou_batch(boxes: Tensor, anchors: Tensor) -> Tensor:
    """``[B, G, A]`` IoU of ``boxes [B, G, 4]`` with ``anchors [A, 4]`` (torchvision's ``box_iou`` arithmetic)."""
    area1 = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # [B, G]
    area2 = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])  # [A]
    lt = torch.max(boxes[..., None, :2], anchors[:, :2])  # [B, G, A, 2]
    rb = torch.min(boxes[..., None, 2:], anchors[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[..., None] + area2 - inter)


def match_anchors_batch(anchors: Tensor, boxes: Tensor, labels: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """:func:`match_anchors` for a whole batch at once, with no host sync.

    Args:
        anchors: ``[A, 4]``; boxes: ``[B, G, 4]`` xyxy, padded; labels: ``[B, G]`` in 1..C-1, 0 where padded.

    Returns:
        ``(anchor_labels [B, A], matched_boxes [B, A, 4])`` as :func:`match_anchors` gives per image (a ground
        truth that is the best of an anchor already claimed by a later one loses it, as torchvision's matcher).
    """
    batch, num_gt = labels.shape
    if num_gt == 0:
        return (
            torch.zeros(batch, anchors.shape[0], dtype=torch.long, device=anchors.device),
            torch.zeros(batch, *anchors.shape, dtype=anchors.dtype, device=anchors.device),
        )
    valid = labels > 0  # [B, G]
    iou = _box_iou_batch(boxes, anchors).masked_fill(~valid[..., None], -1.0)  # [B, G, A]
    best_iou, matches = iou.max(dim=1)  # [B, A]: each anchor's best ground truth
    matches = torch.where(best_iou >= threshold, matches, -1)
    best_anchor = iou.argmax(dim=2)  # [B, G]: each ground truth's best anchor
    gt_index = torch.arange(num_gt, device=labels.device).expand(batch, -1)
    forced = torch.full_like(matches, -1).scatter_reduce(1, best_anchor, torch.where(valid, gt_index, -1), "amax")
    matches = torch.where(forced >= 0, forced, matches)
    index = matches.clamp(min=0)
    anchor_labels = torch.where(matches >= 0, labels.long().gather(1, index), 0)
    matched_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
    return anchor_labels, matched_boxes


def check_labels(targets: list[dict[str, Tensor]], num_classes: int) -> None:
    """Raise ``ValueError`` naming the first target whose labels are outside 1..C-1 (read on the host)."""
    for i, target in enumerate(targets):
        labels = target["labels"].detach().cpu().numpy()
        if labels.size and (labels.min() < 1 or labels.max() >= num_classes):
            raise ValueError(
                f"target {i}: labels must be in 1..{num_classes - 1} (0 is background), got {labels.tolist()}"
            )


class MultiboxMixtureLoss:
    """Computes :class:`LossTerms` from :class:`MixtureOutputs` and per-image targets.

    ``check_targets``: check the labels' range on every call (a host read of the labels); the training loop
    checks them on the host before the upload and turns this off, so that a step never waits for the device.
    """

    def __init__(self, config: LossConfig = LossConfig(), *, check_targets: bool = True):
        self.config = config
        self.box_coder = make_box_coder(config.variances)
        self.matcher = SSDMatcher(config.iou_threshold)  # the per-image reference's (match_anchors)
        self.check_targets = check_targets

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
        if self.check_targets:
            check_labels(targets, num_classes)
        boxes = pad_sequence([t["boxes"].to(anchors).reshape(-1, 4) for t in targets], batch_first=True)
        gt_labels = pad_sequence([t["labels"].to(anchors.device).long() for t in targets], batch_first=True)
        labels, matched = match_anchors_batch(anchors, boxes, gt_labels, cfg.iou_threshold)  # [B, A], [B, A, 4]
        batch, num_anchors = labels.shape
        encoded = self.box_coder.encode_single(matched.reshape(-1, 4), anchors.repeat(batch, 1))
        positive = labels > 0
        # Background anchors get a harmless target (their matched box may be padding); they are masked below.
        encoded = torch.where(positive[..., None], encoded.view(batch, num_anchors, 4), 0.0)  # [B, A, 4]
        num_positives = positive.sum()
        normaliser = num_positives.clamp(min=1)

        loc = mdn.localization_nll(
            encoded,
            outputs.loc_mu,
            outputs.loc_sigma_logit,
            outputs.loc_pi_logit,
            sigma_offset=cfg.sigma_offset,
            nll_scale=cfg.nll_scale,
            eps=cfg.eps,
        )  # [B, A, 4]
        loc = torch.where(positive[..., None], loc, 0.0).sum()
        cls_per_anchor = mdn.classification_loss(
            outputs.cls_logits, outputs.cls_sigma_logit, outputs.cls_pi_logit, labels, noise, cfg.cls_loss, eps=cfg.eps
        )  # [B, A]
        chosen = positive | self._hard_negatives(cls_per_anchor.detach(), positive)
        cls = torch.where(chosen, cls_per_anchor, 0.0).sum()
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
