"""Default boxes of the presets (as data, from the SSD paper and its released configs) and box encoding."""

from __future__ import annotations

from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

__all__ = ["SSD300_SCALES", "ssd300_default_boxes", "ssdlite_default_boxes", "make_box_coder"]

# Box scales relative to the 300-px input; the last value only sets the s'_k of the final level.
# VOC: min sizes 30, 60, 111, 162, 213, 264 px; COCO: 21, 45, 99, 153, 207, 261 px.
SSD300_SCALES = {
    "voc": [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05],
    "coco": [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
}
SSD300_ASPECT_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
SSD300_STEPS = [8, 16, 32, 64, 100, 300]


def ssd300_default_boxes(anchor_set: str = "voc") -> DefaultBoxGenerator:
    """SSD300's 8732 default boxes with the VOC or COCO scales."""
    if anchor_set not in SSD300_SCALES:
        raise ValueError(f"anchor_set must be one of {sorted(SSD300_SCALES)}, got {anchor_set!r}")
    return DefaultBoxGenerator(SSD300_ASPECT_RATIOS, scales=SSD300_SCALES[anchor_set], steps=SSD300_STEPS)


def ssdlite_default_boxes() -> DefaultBoxGenerator:
    """SSDLite's default boxes (six levels, ratios 2 and 3, scales 0.2 … 0.95), as torchvision builds them."""
    return DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)


def make_box_coder(variances: tuple[float, float] = (0.1, 0.2)) -> BoxCoder:
    """SSD's box encoding: centre offsets divided by ``variances[0]``, log sizes by ``variances[1]``."""
    center, size = variances
    return BoxCoder(weights=(1.0 / center, 1.0 / center, 1.0 / size, 1.0 / size))
