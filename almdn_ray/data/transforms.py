"""SSD augmentation with ``torchvision.transforms.v2`` and the detection dataset that applies it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from almdn_ray.data.images import read_image
from almdn_ray.data.records import ImageRecord

logger = logging.getLogger(__name__)

__all__ = ["train_transform", "eval_transform", "DetectionDataset", "record_target"]


def train_transform(
    size: int, *, flip: bool = True, zoom_out: float = 4.0, fill: Sequence[int] = (124, 117, 104)
) -> v2.Transform:
    """SSD's augmentation: photometric distortion, zoom-out, IoU crop, flip, resize to ``size``, [0, 1] floats.

    Args:
        size: output side in pixels (square, as the model takes).
        flip: horizontal flips (off for data whose classes are not mirror-invariant, such as digits).
        zoom_out: largest zoom-out factor (1 disables it).
        fill: zoom-out canvas colour (uint8 RGB; the ImageNet mean by default).
    """
    steps: list[v2.Transform] = [v2.RandomPhotometricDistort(p=0.5)]
    if zoom_out > 1:
        steps.append(
            v2.RandomZoomOut(fill={tv_tensors.Image: list(fill), "others": 0}, side_range=(1.0, zoom_out), p=0.5)
        )
    steps.append(v2.RandomIoUCrop())
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps += [
        v2.Resize((size, size), antialias=True),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(steps)


def eval_transform(size: int) -> v2.Transform:
    """Resize to ``size`` and convert to [0, 1] floats; boxes follow."""
    return v2.Compose([v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True)])


def record_target(record: ImageRecord, *, keep_difficult: bool = False) -> dict[str, np.ndarray]:
    """Training boxes and labels of a record (difficult/crowd boxes dropped unless asked for)."""
    keep = np.ones_like(record.difficult) if keep_difficult else ~record.difficult
    return {"boxes": record.boxes[keep], "labels": record.labels[keep]}


class DetectionDataset(TorchDataset):
    """``(image [3, S, S] float in [0, 1], {"boxes": [G, 4] xyxy px of the S-sized input, "labels": [G]})``.

    Images are read by URI (local or ``s3://``) and decoded with torchvision.
    """

    def __init__(self, records: Sequence[ImageRecord], transform: v2.Transform, *, keep_difficult: bool = False):
        self.records = list(records)
        self.transform = transform
        self.keep_difficult = keep_difficult

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        image = read_image(record.uri)
        if tuple(image.shape[-2:]) != (record.height, record.width):
            raise ValueError(
                f"{record.uri}: image is {image.shape[-1]}x{image.shape[-2]} but its annotation says "
                f"{record.width}x{record.height}; fix the annotation"
            )
        target = record_target(record, keep_difficult=self.keep_difficult)
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(target["boxes"]), format="XYXY", canvas_size=(record.height, record.width)
        )
        image, out = self.transform(
            tv_tensors.Image(image), {"boxes": boxes, "labels": torch.from_numpy(target["labels"])}
        )
        return image.as_subclass(torch.Tensor), {
            "boxes": out["boxes"].as_subclass(torch.Tensor).float(),
            "labels": out["labels"],
        }
