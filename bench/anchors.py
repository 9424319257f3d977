"""Anchor coverage of the demo data (issue 14's first question): can the default boxes match the objects?

    python bench/anchors.py [--images 600] [--sizes 128,160,192,256,320]

Builds the quickstart's demo pool (in a temporary folder), builds the small preset at each input size, takes
its default boxes from one forward pass of the feature extractor, and prints, per size: the number of default
boxes and the share of ground-truth boxes that some default box overlaps at IoU >= 0.5 (all boxes, and the
small ones: longer side < 15 % of the image). A box no default box covers is only learned through SSD's
forced best-anchor match.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torchvision.ops import box_iou


def coverage(records, preset: str, size: int, **model) -> tuple[int, float, float, int]:
    from almdn_ray.model import ModelSpec

    model = ModelSpec(preset=preset, num_classes=11, image_size=size, **model).build().eval()
    with torch.no_grad():
        _, anchors = model.features(torch.zeros(1, 3, size, size))
    covered, small_covered, total, small = 0, 0, 0, 0
    for record in records:
        if not len(record.labels):
            continue
        scale = torch.tensor([size / record.width, size / record.height] * 2)
        boxes = torch.from_numpy(record.boxes).float() * scale
        best = box_iou(boxes, anchors).max(dim=1).values
        original = torch.from_numpy(record.boxes)
        sides = torch.maximum(
            (original[:, 2] - original[:, 0]) / record.width, (original[:, 3] - original[:, 1]) / record.height
        )  # in the image's own pixels: the same boxes are small at every input size
        is_small = sides < 0.15
        covered += int((best >= 0.5).sum())
        small_covered += int(((best >= 0.5) & is_small).sum())
        total += len(boxes)
        small += int(is_small.sum())
    return len(anchors), covered / max(total, 1), small_covered / max(small, 1), small


# The preset's own default boxes, and the small-object setting (stride-8 level, smallest boxes 0.1 of the input)
# with its default scales and with the scales the quickstart uses.
SETTINGS = {
    "preset": {},
    "small_objects": {"small_objects": True},
    "small_objects + quickstart scales": {
        "small_objects": True,
        "anchor_scales": [0.08, 0.16, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0],
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--sizes", default="128,160,192,256,320")
    parser.add_argument("--preset", default="ssdlite320_mobilenet_v3")
    args = parser.parse_args()
    from almdn_ray.data.coco import read_coco
    from almdn_ray.data.demo import DemoConfig, build_demo

    with tempfile.TemporaryDirectory() as folder:
        config = DemoConfig(image_size=160)  # as `make quickstart` builds it (--size 160)
        paths = build_demo(Path(folder), pool_images=args.images, test_images=1, config=config)
        records = read_coco(str(paths["pool"])).records
    boxes = sum(len(r.labels) for r in records)
    print(f"demo pool: {len(records)} images, {boxes} boxes; preset {args.preset}")
    print("")
    print(
        "| model | input px | default boxes | boxes with an anchor at IoU >= 0.5 | small boxes (< 15 % side) covered |"
    )
    print("|---|---|---|---|---|")
    for name, model in SETTINGS.items():
        for size in (int(s) for s in args.sizes.split(",")):
            count, share, small_share, small = coverage(records, args.preset, size, **model)
            print(f"| {name} | {size} | {count} | {share:.0%} | {small_share:.0%} of {small} |")


if __name__ == "__main__":
    main()
