"""Training throughput through Ray Train (1 worker) against the same loop run by ``engine`` alone.

Side by side in one run, on the same images, model and recipe: images/s of ``training.train_worker`` in
this process, and of ``distributed.train_distributed`` with one worker, both steady-state (the loop's own
``images_per_s`` metric, which leaves out start-up) and end to end (wall time, with Ray Train's fixed
start-up cost). Target: steady-state ratio >= 0.9. Ray Train's controller polls its workers at its
default interval here; the tests' 0.1 s poll (set for speed) costs ~13 % of two cores.

    python bench/train.py [--iterations 60] [--image-size 160] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from almdn_ray.data.records import ImageRecord  # noqa: E402
from almdn_ray.data.transforms import DetectionDataset, eval_transform  # noqa: E402
from almdn_ray.model import ModelSpec  # noqa: E402
from almdn_ray.training import LocalContext, TrainRecipe, train_worker  # noqa: E402


def write_images(folder: Path, count: int, size: int) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        image = (rng.random((size, size, 3)) * 120).astype(np.uint8)
        x, y, side = int(rng.integers(0, size // 2)), int(rng.integers(0, size // 2)), size // 3
        image[y : y + side, x : x + side] = (230, 50, 50)
        Image.fromarray(image).save(folder / f"{i}.png")
        records.append(
            ImageRecord(
                str(i),
                str(folder / f"{i}.png"),
                size,
                size,
                np.array([[x, y, x + side, y + side]], np.float32),
                np.array([1]),
                np.array([False]),
            )
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import ray

    from almdn_ray.distributed.train import train_distributed

    print(f"# bench/train.py — {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=2, image_size=args.image_size)
    recipe = TrainRecipe(
        max_iterations=args.iterations,
        batch_size=args.batch_size,
        lr=1e-3,
        warmup_iterations=1,
        lr_steps=(),
        checkpoint_every=max(1, args.iterations // 3),
        augment=False,
        precise_bn_batches=0,
    )
    with tempfile.TemporaryDirectory() as folder:
        records = write_images(Path(folder), 64, args.image_size)
        context = LocalContext()
        start = time.perf_counter()
        train_worker(
            spec=spec,
            dataset=DetectionDataset(records, eval_transform(args.image_size)),
            recipe=recipe,
            context=context,
        )
        local_wall = args.iterations * args.batch_size / (time.perf_counter() - start)
        local_steady = float(np.mean([r["images_per_s"] for r in context.reports[1:]]))

        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        start = time.perf_counter()
        result = train_distributed(
            records=records,
            spec=spec,
            recipe=recipe,
            storage_uri=str(Path(folder) / "run"),
            run_name="bench",
            num_workers=1,
        )
        ray_wall = args.iterations * args.batch_size / (time.perf_counter() - start)
        ray_steady = result.metrics["images_per_s"]
        ray.shutdown()
    print("| path | steady img/s | end-to-end img/s |")
    print("|---|---|---|")
    print(f"| engine alone | {local_steady:.1f} | {local_wall:.1f} |")
    print(f"| Ray Train, 1 worker | {ray_steady:.1f} | {ray_wall:.1f} |")
    print(f"| ratio | {ray_steady / local_steady:.2f} | {ray_wall / local_wall:.2f} |")


if __name__ == "__main__":
    main()
