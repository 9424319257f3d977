"""Pretrain the demo backbone: the small preset's MobileNetV3-Large on digits no demo pool or test split uses.

    python bench/pretrain_backbone.py [--steps 3000] [--images 16000] [--out almdn_ray/data/demo_backbone.pt]

AL-MDN, like every detector of its kind, starts from a backbone pretrained on ImageNet; the demo has no ImageNet,
so this script makes its analogue from the demo's own sources. It renders scenes as the demo does (MNIST digits
pasted on crops of scikit-image's photos, ``almdn_ray.data.demo.render_image``) with only the digits of
:func:`almdn_ray.data.demo.pretrain_instances` (a fixed 40 % of each digit class that the pool and test splits
never draw from), at the detector's input size and with wider digit sizes, and trains the small preset's SSD-GMM
(``small_objects``) on them with the project's own training loop (Adam, batch zoom/shift/colour jitter). Only the
backbone is kept: the SSD head and its extra layers start fresh in every demo job, as they do from ImageNet.

What it buys is measured in bench/README.md ("The demo backbone"), with bench/ceiling.py.

It writes the backbone's ``state_dict`` in torchvision's ``mobilenet_v3_large`` layout (float16, no
``classifier.*``), which ``model.backbone_weights`` loads, and beside it ``<out>.json``: the recipe, the digit
indices' digest, the final loss and the time. Seeded: the same command on the same torch gives the same file up
to floating-point order. About 25 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger("pretrain_backbone")

CLASSES = 11  # background + 10 digits


def digit_digest(indices: np.ndarray) -> str:
    """sha256 of the sorted MNIST indices, as the test that proves disjointness recomputes it."""
    return hashlib.sha256(np.sort(indices).astype(np.int64).tobytes()).hexdigest()


def render_set(count: int, size: int, seed: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]], set[int]]:
    """``count`` scenes of pretraining digits: images ``[N, 3, S, S]`` uint8, their targets (``boxes`` xyxy px,
    ``labels`` 1-10) and the MNIST indices drawn."""
    from almdn_ray.data.demo import DemoConfig, load_mnist, load_photos, pretrain_instances, render_image

    digits, labels = load_mnist()
    photos = load_photos(min_side=size)
    ids = pretrain_instances(labels)
    # Wider than the demo's sizes at its input scale (digits of 30-72 px on 160 px images, seen at 128 px).
    config = DemoConfig(
        image_size=size,
        digits_per_image=(2, 7),
        digit_size=(16, 76),
        small_fraction=0.2,
        small_size=(9, 16),
        max_overlap=0.05,
    )
    images = torch.empty(count, 3, size, size, dtype=torch.uint8)
    targets = []
    drawn: set[int] = set()
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        image, objects = render_image(rng, photos, digits, ids, labels[ids], config)
        images[index] = torch.from_numpy(image).permute(2, 0, 1)
        targets.append(
            {
                "boxes": torch.tensor([obj.box for obj in objects], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([obj.label for obj in objects], dtype=torch.int64),
            }
        )
        drawn.update(obj.instance for obj in objects)
        if (index + 1) % 4000 == 0:
            logger.info("rendered %d / %d scenes", index + 1, count)
    return images, targets, drawn


class Scenes(torch.utils.data.Dataset):
    """Rendered scenes as the training loop takes them: ``(image [3, S, S] in [0, 1], {"boxes", "labels"})``."""

    def __init__(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index].float() / 255, self.targets[index]


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The detector's backbone in torchvision's ``mobilenet_v3_large`` keys (what ``model.backbone_weights``
    loads), float16, without ``classifier.*``: the extractor is rebuilt around a classifier, so that loading
    the trained extractor fills the classifier's modules."""
    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection.ssdlite import _mobilenet_extractor

    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    classifier = mobilenet_v3_large(weights=None, norm_layer=norm_layer, reduced_tail=False)
    extractor = _mobilenet_extractor(classifier, 6, norm_layer)
    extractor.load_state_dict(model.backbone.state_dict())  # WithStride8 keeps the extractor's keys
    return {
        k: (v.half() if v.is_floating_point() else v)
        for k, v in classifier.state_dict().items()
        if not k.startswith("classifier.")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="almdn_ray/data/demo_backbone.pt")
    parser.add_argument("--steps", type=int, default=3000, help="training iterations")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=16000, help="pretraining scenes rendered once")
    parser.add_argument("--size", type=int, default=128, help="the detector's input side")
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--jitter", type=float, default=0.15, help="batch zoom/shift/colour (train.jitter)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from almdn_ray.data.demo import load_mnist, pretrain_instances
    from almdn_ray.model import ModelSpec
    from almdn_ray.training import LocalContext, TrainRecipe, train_worker

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    images, targets, _ = render_set(args.images, args.size, seed=args.seed)
    logger.info("rendered %d scenes in %.0f s", args.images, time.perf_counter() - started)
    # The small preset as the demo jobs use it (stride-8 level, full tail as an ImageNet backbone has); the
    # backbone starts from torchvision's initialisation (a random full-tail state_dict marks it "pretrained").
    spec = ModelSpec(
        preset="ssdlite320_mobilenet_v3",
        num_classes=CLASSES,
        image_size=args.size,
        small_objects=True,
        backbone_weights="(random initialisation)",
    )
    from torchvision.models import mobilenet_v3_large

    init = mobilenet_v3_large(weights=None, reduced_tail=False).state_dict()
    recipe = TrainRecipe(
        max_iterations=args.steps,
        batch_size=args.batch,
        optimizer="adam",
        lr=args.lr,
        warmup_iterations=50,
        lr_steps=(round(args.steps * 0.75),),
        checkpoint_every=args.steps,
        grad_clip=10.0,
        augment=False,
        flip=False,
        jitter=args.jitter,
        data_workers=0,
        precise_bn_batches=10,
        seed=args.seed,
    )
    losses = []

    class Context(LocalContext):
        def report(self, metrics, state):
            losses.append(metrics["loss"])
            super().report(metrics, state)

    def progress(iteration: int) -> None:
        if iteration % 250 == 0:
            logger.info("iteration %d / %d (%.0f s)", iteration, args.steps, time.perf_counter() - started)

    model = train_worker(
        spec=spec,
        dataset=Scenes(images, targets),
        recipe=recipe,
        context=Context(),
        backbone=init,
        on_iteration=progress,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone_state(model), out)
    _, labels = load_mnist()
    record = {
        "what": "MobileNetV3-Large backbone (torchvision mobilenet_v3_large layout, full tail, width 1.0, float16) "
        "of the small preset's SSD-GMM (small_objects) trained to detect the demo's pretraining digits",
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "recipe": {k: v for k, v in vars(args).items() if k != "out"},
        "input_norm": "half",
        "pretrain_digits": {
            "count": int(len(pretrain_instances(labels))),
            "sha256": digit_digest(pretrain_instances(labels)),
        },
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - started),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "bytes": out.stat().st_size,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("wrote %s (%.1f MB), final loss %s", out, out.stat().st_size / 1e6, record["final_loss"])


if __name__ == "__main__":
    main()
