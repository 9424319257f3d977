"""The mixture-density SSD head: one conv per feature level, a K axis in its output, no per-component copies."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from torch import Tensor, nn
from torchvision.models.detection.ssd import SSDScoringHead
from torchvision.ops.misc import Conv2dNormActivation

__all__ = ["MixtureOutputs", "MixtureHead", "enable_dropout"]

BOX_DIMS = 4


class MixtureOutputs(NamedTuple):
    """Raw head outputs of a batch, with the anchors they refer to.

    ``loc_*`` are ``[B, A, K, 4]``; ``cls_logits`` and ``cls_sigma_logit`` ``[B, A, K, C]``;
    ``cls_pi_logit`` ``[B, A, K]``; ``anchors`` ``[A, 4]`` xyxy in input pixels.
    """

    loc_mu: Tensor
    loc_sigma_logit: Tensor
    loc_pi_logit: Tensor
    cls_logits: Tensor
    cls_sigma_logit: Tensor
    cls_pi_logit: Tensor
    anchors: Tensor


def _predictor(in_channels: int, out_channels: int, *, separable: bool) -> nn.Module:
    if not separable:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        nn.init.xavier_uniform_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    return nn.Sequential(  # SSDLite: depthwise 3x3 + pointwise 1x1
        Conv2dNormActivation(
            in_channels, in_channels, kernel_size=3, groups=in_channels, norm_layer=norm, activation_layer=nn.ReLU6
        ),
        nn.Conv2d(in_channels, out_channels, kernel_size=1),
    )


class MixtureHead(nn.Module):
    """Predicts a K-component mixture for the box and the class of every anchor.

    Per anchor the box head outputs ``K × (μ, σ-logit, π-logit)`` for 4 coordinates and the class head
    ``K × (logits, σ-logit)`` over C classes plus one π-logit per component.

    Args:
        in_channels: channels of each feature map.
        num_anchors: anchors per location of each feature map.
        num_classes: C, background included.
        num_components: K.
        separable: depthwise-separable predictors (SSDLite) instead of plain 3x3 convs (SSD).
        dropout: element-wise dropout on every feature map before the predictors (0 = none). It is on in
            training; MC-dropout scoring (:func:`enable_dropout`) keeps it on at inference too.
    """

    def __init__(
        self,
        *,
        in_channels: list[int],
        num_anchors: list[int],
        num_classes: int,
        num_components: int = 4,
        separable: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if num_classes < 2:
            raise ValueError(f"num_classes must count background and at least one class, got {num_classes}")
        self.num_classes = num_classes
        self.num_components = num_components
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        box_columns = num_components * 3 * BOX_DIMS
        cls_columns = num_components * (2 * num_classes + 1)
        self.box_head = SSDScoringHead(
            nn.ModuleList(
                _predictor(c, a * box_columns, separable=separable) for c, a in zip(in_channels, num_anchors)
            ),
            box_columns,
        )
        self.cls_head = SSDScoringHead(
            nn.ModuleList(
                _predictor(c, a * cls_columns, separable=separable) for c, a in zip(in_channels, num_anchors)
            ),
            cls_columns,
        )

    def forward(self, features: list[Tensor], anchors: Tensor) -> MixtureOutputs:
        """Args: feature maps ``[B, C_l, H_l, W_l]``; anchors ``[A, 4]``. Returns: :class:`MixtureOutputs`."""
        k, c = self.num_components, self.num_classes
        features = [self.dropout(f) for f in features]
        box = self.box_head(features)  # [B, A, K*12]
        batch, num_anchors = box.shape[:2]
        assert num_anchors == anchors.shape[0], (box.shape, anchors.shape)
        loc_mu, loc_sigma_logit, loc_pi_logit = box.view(batch, num_anchors, k, 3 * BOX_DIMS).split(BOX_DIMS, -1)
        cls = self.cls_head(features).view(batch, num_anchors, k, 2 * c + 1)  # [B, A, K, 2C+1]
        cls_logits, cls_sigma_logit, cls_pi_logit = cls.split([c, c, 1], dim=-1)
        return MixtureOutputs(
            loc_mu, loc_sigma_logit, loc_pi_logit, cls_logits, cls_sigma_logit, cls_pi_logit.squeeze(-1), anchors
        )


def enable_dropout(model: nn.Module) -> int:
    """Put every dropout layer of ``model`` in training mode (the rest stays as it is: BatchNorm in eval).

    Returns:
        How many dropout layers with p > 0 were switched on (0: the model has none, MC dropout is impossible).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.train()
            count += 1
    return count
