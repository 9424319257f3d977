"""Default boxes of the presets (as data, from the SSD paper and its released configs) and box encoding."""

from __future__ import annotations

from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

__all__ = ["SSD300_SCALES", "ssd300_default_boxes", "ssdlite_default_boxes", "check_scales", "make_box_coder"]

# Box scales relative to the 300-px input; the last value only sets the s'_k of the final level.
# VOC: min sizes 30, 60, 111, 162, 213, 264 px; COCO: 21, 45, 99, 153, 207, 261 px.
SSD300_SCALES = {
    "voc": [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05],
    "coco": [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
}
SSD300_ASPECT_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
SSD300_STEPS = [8, 16, 32, 64, 100, 300]


def ssd300_default_boxes(anchor_set: str = "voc", scales: list[float] | None = None) -> DefaultBoxGenerator:
    """SSD300's 8732 default boxes with the VOC or COCO scales (or ``scales``: 7 values, see
    :func:`ssdlite_default_boxes`)."""
    if anchor_set not in SSD300_SCALES:
        raise ValueError(f"anchor_set must be one of {sorted(SSD300_SCALES)}, got {anchor_set!r}")
    if scales is not None:
        check_scales(scales, len(SSD300_STEPS))
    chosen = list(scales) if scales is not None else SSD300_SCALES[anchor_set]
    return DefaultBoxGenerator(SSD300_ASPECT_RATIOS, scales=chosen, steps=SSD300_STEPS)


def ssdlite_default_boxes(
    levels: int = 6, scales: list[float] | None = None, aspect_ratios: list[int] | None = None
) -> DefaultBoxGenerator:
    """SSDLite's default boxes: ``levels`` feature maps, ratios 2 and 3, scales 0.2 … 0.95 spaced evenly (as
    torchvision builds them), or ``scales`` given (``levels + 1`` values relative to the input: level k's box
    sides, the last only sets the final level's in-between box ``sqrt(s_k s_k+1)``)."""
    ratios = [list(aspect_ratios or (2, 3)) for _ in range(levels)]
    if scales is None:
        if levels == 7:  # with the stride-8 level: 0.1 there, then SSDLite's own
            return DefaultBoxGenerator(ratios, scales=[0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0])
        return DefaultBoxGenerator(ratios, min_ratio=0.2, max_ratio=0.95)
    check_scales(scales, levels)
    return DefaultBoxGenerator(ratios, scales=list(scales))


def check_scales(scales: list[float], levels: int) -> None:
    """``model.anchor_scales``: ``levels + 1`` increasing values in (0, 2]."""
    if len(scales) != levels + 1:
        raise ValueError(
            f"model.anchor_scales has {len(scales)} values; this model has {levels} feature levels, so give "
            f"{levels + 1} (one box side per level relative to the input, then the last level's upper side)"
        )
    if any(not 0 < s <= 2 for s in scales) or list(scales) != sorted(scales):
        raise ValueError(f"model.anchor_scales must increase and lie in (0, 2], got {list(scales)}")


def make_box_coder(variances: tuple[float, float] = (0.1, 0.2)) -> BoxCoder:
    """SSD's box encoding: centre offsets divided by ``variances[0]``, log sizes by ``variances[1]``."""
    center, size = variances
    return BoxCoder(weights=(1.0 / center, 1.0 / center, 1.0 / size, 1.0 / size))
