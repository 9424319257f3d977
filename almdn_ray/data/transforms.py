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

__all__ = ["train_transform", "eval_transform", "batch_jitter", "DetectionDataset", "record_target"]


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


def batch_jitter(
    images: torch.Tensor, targets: list[dict[str, torch.Tensor]], strength: float, *, min_visible: float = 0.6
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Light augmentation of a whole batch on its device (for small data trained briefly): each image is zoomed
    by a factor in ``[1 - strength, 1 + strength]``, shifted by up to ``strength`` of its side, has its colour
    channels permuted and its brightness and contrast scaled by up to ``strength``. Boxes follow; a box less than
    ``min_visible`` of which stays in the image is dropped. Draws come from torch's global generator (the
    training loop seeds it per iteration, so a resumed run sees the same batches).

    Args:
        images: ``[B, 3, H, W]`` in [0, 1].
        targets: per image ``boxes [G, 4]`` xyxy in input pixels and ``labels [G]``.
        strength: 0 returns the batch unchanged; 0.2 is mild.
    """
    if strength <= 0:
        return images, targets
    import torch.nn.functional as F

    batch, _, height, width = images.shape
    device = images.device
    scale = 1.0 + (torch.rand(batch) * 2 - 1) * strength
    shift = (torch.rand(batch, 2) * 2 - 1) * strength * 2  # in [-1, 1] coordinates: up to `strength` of a side
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = -shift / scale[:, None]
    grid = F.affine_grid(theta.to(device), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    permutation = torch.argsort(torch.rand(batch, 3), dim=1).to(device)
    out = out.gather(1, permutation[:, :, None, None].expand_as(out))
    brightness = (1.0 + (torch.rand(batch, 1, 1, 1) * 2 - 1) * strength).to(device, images.dtype)
    contrast = (1.0 + (torch.rand(batch, 1, 1, 1) * 2 - 1) * strength).to(device, images.dtype)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean * brightness).clamp(0.0, 1.0)
    size = torch.tensor([width, height, width, height], dtype=torch.float32)
    jittered = []
    for i, target in enumerate(targets):
        boxes = target["boxes"].float().cpu()
        if boxes.numel() == 0:
            jittered.append(target)
            continue
        normal = boxes / size * 2 - 1
        moved = normal * scale[i] + shift[i].repeat(2)
        moved = (moved + 1) / 2 * size
        clipped = torch.stack(
            [
                moved[:, 0].clamp(0, width),
                moved[:, 1].clamp(0, height),
                moved[:, 2].clamp(0, width),
                moved[:, 3].clamp(0, height),
            ],
            dim=1,
        )
        area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        kept_area = (clipped[:, 2] - clipped[:, 0]).clamp(min=0) * (clipped[:, 3] - clipped[:, 1]).clamp(min=0)
        keep = kept_area >= min_visible * area
        jittered.append({**target, "boxes": clipped[keep].to(target["boxes"].device), "labels": target["labels"][keep]})
    return out, jittered
