"""Scoring cost per pool image of each acquisition strategy, side by side in one process.

    python bench/strategy_cost.py [--images 96] [--weights MODEL.pt] [--size 128]

AL-MDN (and entropy, random: the same single pass) scores with one deterministic forward pass;
MC dropout with that pass plus T passes with dropout on; an ensemble with M models. The paper's cost
claim is that AL-MDN's single pass is several times cheaper than both. Each method scores the same images
through ``scoring.score_images`` (read, resize, forward passes, uncertainties, per-image summary), three
rounds interleaved, median taken; ratios are to AL-MDN in the same run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from almdn_ray import scoring
from almdn_ray.model import ModelSpec
from almdn_ray.model.postprocess import PostprocessConfig

logger = logging.getLogger("bench.strategy_cost")


def trained_models(folder: Path, args, spec: ModelSpec) -> tuple[list[torch.nn.Module], list[str]]:
    """1 + (M - 1) small models trained briefly on demo data (trained weights give the realistic number of
    detections per image that post-processing costs; random weights give none or thousands)."""
    from almdn_ray.data.coco import read_coco
    from almdn_ray.data.demo import DemoConfig, build_demo
    from almdn_ray.data.transforms import DetectionDataset, eval_transform
    from almdn_ray.training import LocalContext, TrainRecipe, train_worker

    demo = build_demo(folder / "demo", pool_images=args.images + 64, test_images=8, config=DemoConfig(image_size=160))
    records = read_coco(str(demo["pool"])).records
    train, pool = records[:64], records[64:]
    models = []
    for m in range(args.ensemble):
        if args.weights:
            torch.manual_seed(m)
            model = spec.build()
            model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        else:
            recipe = TrainRecipe(
                max_iterations=args.train_iterations,
                batch_size=8,
                optimizer="adam",
                lr=0.004,
                warmup_iterations=10,
                lr_steps=(),
                checkpoint_every=args.train_iterations,
                augment=False,
                flip=False,
                seed=m,
            )
            dataset = DetectionDataset(train, eval_transform(spec.input_size))
            model = train_worker(spec=spec, dataset=dataset, recipe=recipe, context=LocalContext())
        models.append(model.eval())
    return models, [r.uri for r in pool[: args.images]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=128, help="model input side (the quickstart's 128)")
    parser.add_argument("--classes", type=int, default=11, help="with background (the demo's 10 digits + 1)")
    parser.add_argument("--weights", default=None, help="a trained model.pt (default: train small ones here)")
    parser.add_argument("--mc-passes", type=int, default=10)
    parser.add_argument("--ensemble", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-iterations", type=int, default=150, help="per model, when no --weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=args.classes, image_size=args.size, dropout=0.1)
    config = PostprocessConfig()  # the paper's scoring thresholds
    with tempfile.TemporaryDirectory() as folder:
        (model, *members), uris = trained_models(Path(folder), args, spec)
        methods = {
            "almdn (1 pass)": {},
            f"mc_dropout (1 + {args.mc_passes} passes)": {"mc_passes": args.mc_passes},
            f"ensemble ({args.ensemble} models)": {"members": members},
        }
        ids = [str(i) for i in range(args.images)]
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(3):
            for name, extra in methods.items():
                start = time.perf_counter()
                for b in range(0, len(ids), args.batch):
                    scoring.score_images(
                        model, ids[b : b + args.batch], uris[b : b + args.batch], config=config, **extra
                    )
                times[name].append((time.perf_counter() - start) / len(ids))
    base = statistics.median(times["almdn (1 pass)"])
    print(f"scoring cost per image, {args.images} images at {args.size}px, {torch.get_num_threads()} torch threads")
    print("| strategy | ms/image | x almdn |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {1000 * statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")
    print(f"training per cycle: almdn, mc_dropout: 1 model; ensemble: {args.ensemble} models ({args.ensemble}x)")


if __name__ == "__main__":
    main()
