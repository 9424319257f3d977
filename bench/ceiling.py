"""The ceiling the active-learning curve climbs towards: fully supervised mAP of a job's model vs iterations.

    python bench/ceiling.py [--job jobs/quickstart.yaml] [--labels 400,800] [--iterations 300,600,1200 | --epochs 16]
                            [--set model.small_objects=true --set train.lr=0.002 ...] [--train-map] [--terms]

Trains the job's model (its preset, anchors and recipe, with ``--set`` overrides) with the one training loop
(:func:`almdn_ray.training.train_worker`, in this process, no Ray) on the first ``--labels`` images of the
job's pool with their labels, once per labelled-set size and iteration count (the recipe's ``lr_steps`` scaled
to each length), and evaluates each model on the job's test split (VOC07 mAP, as the cycles do) and, with
``--train-map``, on the images it trained on. Also prints the training images/s, so a schedule can be sized to
a time budget. ``--set model.backbone_weights=null`` trains the same model from scratch. The demo data must
exist (``make quickstart`` or ``almdn-ray data demo data/demo --images 600 --test-images 200 --size 160``).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace

import yaml


def _override(data: dict, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    *parents, leaf = key.split(".")
    for parent in parents:
        data = data.setdefault(parent, {})
    data[leaf] = yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/quickstart.yaml")
    parser.add_argument("--labels", default="600", help="pool images trained on (all labelled), comma-separated")
    parser.add_argument("--iterations", default="300,600,1200")
    parser.add_argument(
        "--epochs", type=float, default=None, help="instead of --iterations: epochs x labelled / batch iterations"
    )
    parser.add_argument("--set", action="append", default=[], help="job key=value override (YAML value)")
    parser.add_argument("--train-map", action="store_true", help="also evaluate on the training images")
    parser.add_argument("--terms", action="store_true", help="print the uncertainty terms of the last model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from almdn_ray.config import spec_from_dict
    from almdn_ray.data.transforms import DetectionDataset, eval_transform, train_transform
    from almdn_ray.data.validate import read_dataset
    from almdn_ray.evaluation import evaluate
    from almdn_ray.model.backbones import load_state_dict_file
    from almdn_ray.training import LocalContext, train_worker

    with open(args.job) as stream:
        data = yaml.safe_load(stream)
    for assignment in args.set:
        _override(data, assignment)
    job = spec_from_dict(data, args.job)
    pool = read_dataset(job.dataset.train)
    test = read_dataset(job.dataset.test).with_classes(pool.classes, job.dataset.test)
    spec = replace(job.model, num_classes=pool.num_classes)
    size = spec.input_size
    recipe = job.train
    # The backbone file, as the TRAIN stage reads it (a model with backbone_weights null trains from scratch).
    backbone = load_state_dict_file(spec.backbone_weights) if spec.backbone_weights else None
    transform = train_transform(size, flip=recipe.flip) if recipe.augment else eval_transform(size)
    print(
        f"job {args.job} with {args.set or 'no overrides'}: {size} px, test split {len(test.records)} images, "
        f"backbone {spec.backbone_weights or 'none (from scratch)'}"
    )
    print("| labelled | iterations | VOC07 mAP (test) | mAP (own training images) | train s | train img/s |")
    print("|---|---|---|---|---|---|")
    for labels in (int(n) for n in args.labels.split(",")):
        records = pool.records[:labels]
        if len(records) < labels:
            raise SystemExit(f"{job.dataset.train} has {len(records)} images, fewer than --labels {labels}")
        dataset = DetectionDataset(records, transform)
        lengths = [int(i) for i in args.iterations.split(",")]
        if args.epochs:
            lengths = [max(1, round(args.epochs * labels / recipe.batch_size))]
        for iterations in lengths:
            scale = iterations / recipe.max_iterations
            scaled = replace(
                recipe,
                max_iterations=iterations,
                lr_steps=tuple(round(s * scale) for s in recipe.lr_steps),
                warmup_iterations=round(recipe.warmup_iterations * min(1.0, scale)),
                checkpoint_every=iterations,
            )
            torch.manual_seed(0)
            start = time.perf_counter()
            model = train_worker(spec=spec, dataset=dataset, recipe=scaled, context=LocalContext(), backbone=backbone)
            seconds = time.perf_counter() - start
            metrics = evaluate(model.eval(), test, batch_size=32, log_every=0)
            seen = "-"
            if args.train_map:
                own = evaluate(model.eval(), replace(pool, records=records), batch_size=32, log_every=0)
                seen = f"{own['map_voc07']:.3f}"
            print(
                f"| {labels} | {iterations} | {metrics['map_voc07']:.3f} | {seen} | {seconds:.0f} | "
                f"{iterations * recipe.batch_size / seconds:.0f} |",
                flush=True,
            )
    if args.terms:
        print_term_distributions(model, pool.records[labels:] or pool.records, job)


def print_term_distributions(model, records, job) -> None:
    """Quantiles of the four AL-MDN terms over the detections (confidence >= min_confidence) of images the
    model did not train on (or, if it trained on all, the pool), and of their per-image maxima."""
    import numpy as np
    import torch

    from almdn_ray import engine
    from almdn_ray.data.images import read_image
    from almdn_ray.data.transforms import eval_transform

    transform = eval_transform(model.image_size)
    detections = []
    for start in range(0, len(records), 32):
        images = torch.stack([transform(read_image(r.uri)) for r in records[start : start + 32]])
        detections += engine.predict(model, images, config=job.acquisition.postprocess(), batch_size=32)
    names = ("loc_al", "loc_ep", "cls_al", "cls_ep")
    with_det = [d for d in detections if len(d.scores)]
    print(f"\nterms on {len(records)} images ({len(with_det)} with a detection >= min_confidence):")
    print("| term | over | n | p5 | p25 | median | p75 | p95 | max | share >= 0.99 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        rows = np.concatenate([getattr(d, name).numpy() for d in with_det]) if with_det else np.zeros(0)
        maxima = np.array([float(getattr(d, name).max()) for d in with_det])
        for over, values in (("detections", rows), ("image maxima", maxima)):
            if not len(values):
                continue
            q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
            print(
                f"| {name} | {over} | {len(values)} | "
                + " | ".join(f"{v:.3g}" for v in q)
                + f" | {values.max():.3g} | {(values >= 0.99).mean():.2f} |"
            )


if __name__ == "__main__":
    main()
