"""Pretrain the demo backbone: the small preset's MobileNetV3-Large on digits no demo pool or test split uses.

    python bench/pretrain_backbone.py [--steps 1500] [--images 16000] [--out almdn_ray/data/demo_backbone.pt]

AL-MDN, like every detector of its kind, starts from a backbone pretrained on ImageNet; the demo has no ImageNet,
so this script makes its analogue from the demo's own sources. It renders scenes as the demo does (MNIST digits
pasted on crops of scikit-image's photos, ``almdn_ray.data.demo.render_image``) with only the digits of
:func:`almdn_ray.data.demo.pretrain_instances` (a fixed 40 % of each digit class that the pool and test splits
never draw from), at the detector's input size and wider digit sizes, and trains the backbone to classify every
cell of its stride-8, 16 and 32 feature maps as background or the digit whose box covers the cell (a 1x1
convolution per map; zoom, shift and colour jitter per batch). Only the backbone is kept: the SSD head, its
extra layers and these 1x1 classifiers are not.

It writes the backbone's ``state_dict`` in torchvision's ``mobilenet_v3_large`` layout (float16, no
``classifier.*``), which ``model.backbone_weights`` loads, and beside it ``<out>.json``: the recipe, the digit
indices' digest, the held-out cell accuracy and the time. Seeded: the same command on the same torch gives the
same file up to floating-point order. About 25 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("pretrain_backbone")

CLASSES = 11  # background + 10 digits
LEVELS = 3  # stride 8, 16, 32
# Background cells outnumber digit cells about 5 to 1: weigh them down so the digits are learnt from the start.
_CLASS_WEIGHTS = torch.tensor([0.25] + [1.0] * (CLASSES - 1))


def digit_digest(indices: np.ndarray) -> str:
    """sha256 of the sorted MNIST indices, as the test that proves disjointness recomputes it."""
    return hashlib.sha256(np.sort(indices).astype(np.int64).tobytes()).hexdigest()


def render_set(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, set[int]]:
    """``count`` scenes of pretraining digits: images ``[N, 3, S, S]`` uint8, label maps ``[N, S, S]`` uint8
    (each pixel: the label 1-10 of the smallest box covering it, 0 for background) and the MNIST indices drawn."""
    from almdn_ray.data.demo import DemoConfig, load_mnist, load_photos, pretrain_instances, render_image

    digits, labels = load_mnist()
    photos = load_photos(min_side=size)
    ids = pretrain_instances(labels)
    # Wider than the demo's sizes at its input scale (digits of 30-72 px on 160 px images seen at 128 px).
    config = DemoConfig(
        image_size=size,
        digits_per_image=(2, 7),
        digit_size=(16, 76),
        small_fraction=0.2,
        small_size=(9, 16),
        max_overlap=0.05,
    )
    images = torch.empty(count, 3, size, size, dtype=torch.uint8)
    maps = torch.zeros(count, size, size, dtype=torch.uint8)
    drawn: set[int] = set()
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        image, objects = render_image(rng, photos, digits, ids, labels[ids], config)
        images[index] = torch.from_numpy(image).permute(2, 0, 1)
        label_map = np.zeros((size, size), np.uint8)
        for obj in sorted(objects, key=lambda o: -(o.box[2] - o.box[0]) * (o.box[3] - o.box[1])):
            x1, y1, x2, y2 = (int(round(v)) for v in obj.box)
            label_map[y1:y2, x1:x2] = obj.label
        maps[index] = torch.from_numpy(label_map)
        drawn.update(obj.instance for obj in objects)
        if (index + 1) % 2000 == 0:
            logger.info("rendered %d / %d scenes", index + 1, count)
    return images, maps, drawn


def jitter(images: torch.Tensor, maps: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom (0.6-1.4), shift, channel permutation, brightness and contrast per image; label maps follow."""
    batch = images.shape[0]
    scale = 0.6 + 0.8 * torch.rand(batch, generator=generator)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * 0.4
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = -shift / scale[:, None]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    moved = F.grid_sample(maps[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    permutation = torch.argsort(torch.rand(batch, 3, generator=generator), dim=1)
    out = out.gather(1, permutation[:, :, None, None].expand_as(out))
    brightness = 1.0 + (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1) * 0.3
    contrast = 1.0 + (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1) * 0.3
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean * brightness).clamp(0.0, 1.0)
    return out, moved[:, 0].long()


class DensePretrainer(nn.Module):
    """torchvision's MobileNetV3-Large (full tail, the small preset's BatchNorm) and a 1x1 classifier on its
    stride-8, 16 and 32 maps, taken where the SSDLite extractor (with ``small_objects``) takes them."""

    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        from torchvision.models import mobilenet_v3_large
        from torchvision.models.detection.ssdlite import _mobilenet_extractor

        from almdn_ray.model.backbones import INPUT_NORMS

        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        self.classifier = mobilenet_v3_large(
            weights=None, norm_layer=norm_layer, reduced_tail=False, width_mult=width_mult
        )
        extractor = _mobilenet_extractor(self.classifier, 6, norm_layer)  # shares the classifier's modules
        self.stages = extractor.features
        self.split = [i for i, block in enumerate(self.classifier.features) if getattr(block, "_is_cn", False)][-2]
        mean, std = INPUT_NORMS["half"]  # the small preset's input scaling
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            channels = [m.shape[1] for m in self.maps(torch.zeros(1, 3, 64, 64))]
        self.heads = nn.ModuleList(nn.Conv2d(c, CLASSES, 1) for c in channels)

    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        first = self.stages[0]
        stride8 = first[: self.split](x)
        stride16 = first[self.split :](stride8)
        return [stride8, stride16, self.stages[1](stride16)]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [head(m) for head, m in zip(self.heads, self.maps(images), strict=True)]

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone in ``mobilenet_v3_large`` keys, float16, without ``classifier.*``."""
        return {
            k: (v.half() if v.is_floating_point() else v)
            for k, v in self.classifier.state_dict().items()
            if not k.startswith("classifier.")
        }


def cell_targets(maps: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The label at each cell's centre."""
    size = maps.shape[-1]
    rows = ((torch.arange(shape[0]) + 0.5) * size / shape[0]).long().clamp(max=size - 1)
    cols = ((torch.arange(shape[1]) + 0.5) * size / shape[1]).long().clamp(max=size - 1)
    return maps[:, rows][:, :, cols].long()


def loss_and_hits(model: DensePretrainer, images, maps) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    total, hits = 0.0, []
    for logits in model(images):
        target = cell_targets(maps, tuple(logits.shape[-2:]))
        total = total + F.cross_entropy(logits, target, weight=_CLASS_WEIGHTS)
        foreground = target > 0
        correct = (logits.argmax(1) == target) & foreground
        hits.append((int(correct.sum()), int(foreground.sum())))
    return total / LEVELS, hits


def evaluate(model: DensePretrainer, images, maps, batch: int = 128) -> list[float]:
    """Foreground cell accuracy per level on held-out scenes (no jitter)."""
    model.eval()
    sums = np.zeros((LEVELS, 2))
    with torch.no_grad():
        for start in range(0, len(images), batch):
            _, hits = loss_and_hits(model, images[start : start + batch].float() / 255, maps[start : start + batch])
            sums += np.array(hits)
    model.train()
    return [float(c / max(n, 1)) for c, n in sums]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="almdn_ray/data/demo_backbone.pt")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=16000, help="pretraining scenes rendered once")
    parser.add_argument("--held-out", type=int, default=500, help="scenes (other seeds) for the accuracy")
    parser.add_argument("--size", type=int, default=128, help="the detector's input side")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from almdn_ray.data.demo import load_mnist, pretrain_instances

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    images, maps, _ = render_set(args.images, args.size, seed=args.seed)
    held_images, held_maps, _ = render_set(args.held_out, args.size, seed=args.seed + 1_000_003)
    logger.info("rendered %d + %d scenes in %.0f s", args.images, args.held_out, time.perf_counter() - started)

    model = DensePretrainer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = 50

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=generator)
    cursor, running = 0, []
    for step in range(args.steps):
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor : cursor + args.batch]
        cursor += args.batch
        batch, targets = jitter(images[index].float() / 255, maps[index], generator)
        loss, _ = loss_and_hits(model, batch, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            accuracy = evaluate(model, held_images, held_maps) if (step + 1) % 500 == 0 else None
            logger.info(
                "step %d / %d: loss %.3f%s (%.0f s)",
                step + 1,
                args.steps,
                np.mean(running[-100:]),
                f", held-out foreground cell accuracy {[round(a, 3) for a in accuracy]}" if accuracy else "",
                time.perf_counter() - started,
            )
    accuracy = evaluate(model, held_images, held_maps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.backbone_state(), out)
    _, labels = load_mnist()
    record = {
        "what": "MobileNetV3-Large backbone (torchvision mobilenet_v3_large layout, full tail, width 1.0, float16) "
        "pretrained on the demo's pretraining digits: dense digit classification at stride 8/16/32",
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "recipe": {k: v for k, v in vars(args).items() if k != "out"},
        "input_norm": "half",
        "pretrain_digits": {
            "count": int(len(pretrain_instances(labels))),
            "sha256": digit_digest(pretrain_instances(labels)),
        },
        "held_out_foreground_cell_accuracy": {"stride8": accuracy[0], "stride16": accuracy[1], "stride32": accuracy[2]},
        "final_loss": float(np.mean(running[-100:])),
        "seconds": round(time.perf_counter() - started),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "bytes": out.stat().st_size,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("wrote %s (%.1f MB): held-out accuracy %s", out, out.stat().st_size / 1e6, accuracy)


if __name__ == "__main__":
    main()
