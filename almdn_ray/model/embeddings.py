"""Compact embeddings from the scoring pass's own feature maps (issue 15): one per image, one per detection.

No second forward pass: the detector's feature maps are pooled (globally for the image, RoI-aligned inside each
detection's box for the objects), each level scaled to unit length so that no level dominates by its channel
count, and projected to ``dims`` by a fixed random Gaussian matrix. The matrix is a pure function of
``(seed, input width)`` drawn on the CPU, so every scoring actor on every node projects the same way and the
embeddings of one cycle are comparable across shards. Random projection keeps distances up to a small
distortion (Johnson-Lindenstrauss); the rows come out unit length, stored as float16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["Embedder"]


class Embedder:
    """Projects pooled feature maps to ``dims``-dimensional unit rows.

    Args:
        dims: output width (64-256 is plenty for near-duplicate and diversity search).
        seed: seeds the projection matrices (the same everywhere for a given seed).
        object_levels: how many of the finest feature levels the per-detection RoI features pool from.
        max_objects: per image, only the first (most confident) this many detections are embedded.
    """

    def __init__(self, dims: int = 128, *, seed: int = 0, object_levels: int = 3, max_objects: int = 8):
        if dims < 1:
            raise ValueError(f"embedding dims must be >= 1, got {dims}")
        self.dims, self.seed, self.object_levels, self.max_objects = dims, seed, object_levels, max_objects
        self._projections: dict[tuple[int, str], Tensor] = {}

    def _project(self, pooled: Sequence[Tensor], kind: str) -> Tensor:
        """``[N, C_l]`` per level -> ``[N, dims]`` unit rows (float32)."""
        joined = torch.cat([torch.nn.functional.normalize(p.float(), dim=1) for p in pooled], dim=1)
        key = (joined.shape[1], kind)
        if key not in self._projections:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + joined.shape[1] + (kind == "object"))
            self._projections[key] = torch.randn(joined.shape[1], self.dims, generator=generator) / self.dims**0.5
        projection = self._projections[key].to(joined.device)
        return torch.nn.functional.normalize(joined @ projection, dim=1)

    @torch.no_grad()
    def images(self, features: Sequence[Tensor]) -> Tensor:
        """``[B, dims]``: each image's feature maps averaged over space, per level, then projected."""
        return self._project([level.mean(dim=(2, 3)) for level in features], "image")

    @torch.no_grad()
    def objects(self, features: Sequence[Tensor], boxes: Sequence[Tensor], image_size: int) -> list[Tensor]:
        """``[min(D_i, max_objects), dims]`` per image: each of its first ``max_objects`` boxes (xyxy, input
        pixels; detections come sorted by confidence) RoI-aligned (2x2, averaged) on the finest ``object_levels``
        maps, then projected."""
        boxes = [b[: self.max_objects] for b in boxes]
        counts = [len(b) for b in boxes]
        device = features[0].device
        image = torch.repeat_interleave(torch.arange(len(boxes), device=device), torch.tensor(counts, device=device))
        rows = torch.cat([b.to(device=device, dtype=torch.float32) for b in boxes]) if boxes else None
        if rows is None or sum(counts) == 0:
            return [torch.zeros(0, self.dims) for _ in boxes]
        return list(self.objects_flat(features, image, rows, image_size).cpu().split(counts))

    @torch.no_grad()
    def objects_flat(self, features: Sequence[Tensor], image: Tensor, boxes: Tensor, image_size: int) -> Tensor:
        """``[N, dims]``: the boxes ``[N, 4]`` (xyxy, input pixels) of images ``image [N]`` RoI-aligned (2x2,
        averaged) on the finest ``object_levels`` maps, then projected; on the features' device, no host sync."""
        if boxes.shape[0] == 0:
            return torch.zeros(0, self.dims, device=boxes.device)
        rois = torch.cat([image[:, None].to(torch.float32), boxes.to(torch.float32)], dim=1)  # [N, 5]
        pooled = []
        for level in features[: self.object_levels]:
            scale = level.shape[-1] / image_size
            aligned = roi_align(level.float(), rois, output_size=2, spatial_scale=scale, sampling_ratio=2, aligned=True)
            pooled.append(aligned.mean(dim=(2, 3)))
        return self._project(pooled, "object")
