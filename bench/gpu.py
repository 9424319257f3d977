"""GPU throughput of almdn-ray on one CUDA device, each number beside its reference in the same run (issue 22).

a. forward: SSD300-GMM (21 classes, 300 px) at batch 256, fp32 (cuDNN's TF32 default) and bf16 + channels_last:
   ms per batch, img/s, TFLOP/s (convolution MACs x 2); plain SSD300 beside it for the mixture head's cost.
b. scoring: the scoring actor's work per batch (``scoring.score_images`` on pre-decoded uint8, bf16), split into
   upload / forward / post-processing / summary, with detections per image: the small preset trained here on
   the demo data (realistic detections) beside random weights (the issue's 848 detections per image).
c. pipeline: ``distributed.score_pool`` with ``use_gpu`` on synthetic 500x375 JPEGs (cut from scikit-image's
   photographs): img/s and GPU busy % (NVML) per batch size, beside the bare bf16 forward at that batch.
d. train: ``training.train_worker`` on CUDA: the small preset at batch 8 (before issue 22: 118 ms/it through
   Ray Train) and SSD300-GMM at batch 32 (bf16): steady ms per iteration and img/s.
e. run: the seconds of each stage of a short ``almdn-ray run`` of the quickstart job with ``use_gpu: true``
   (``state.json``'s history).

Each part runs in a process of its own under a time cap (its cap, scaled down to fit ``--budget-s``), so that
a failure or a hang in one is reported and the next one still runs. Without CUDA each part says so and the
script exits 0. Parts b, d and e use the demo data (``--demo``) when it is there:

    python -m almdn_ray data demo data/demo --images 600 --test-images 200 --size 160
    python bench/gpu.py [--parts a,b,c,d,e] [--budget-s 475] [--demo data/demo] [--pool-images 4000]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"a": "forward", "b": "scoring", "c": "pipeline", "d": "train", "e": "run"}
CAPS_S = {"a": 35, "b": 70, "c": 170, "d": 60, "e": 140}  # 475 s in all
BASELINE_MS_PER_IT = 118.0  # the quickstart's TRAIN on the H200 before issue 22 (Ray Train, small preset, batch 8)
DEVICE = torch.device("cuda")  # --device cpu: a check that the script still runs (tiny sizes), no measurement
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "motorcycle_left.png")


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Busy:
    """The GPU's utilisation (NVML), sampled every 20 ms in a thread until :meth:`stop`."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: list[int] = []
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(0.02)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return float(np.mean(self.samples)) if self.samples else float("nan")


def busy_sampler() -> Busy | None:
    try:
        return Busy()
    except Exception as error:  # no pynvml, or NVML refused: the rate is still measured
        print(f"GPU busy %: not sampled ({error})")
        return None


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, *, budget_s: float = 2.0, most: int = 10) -> float:
    """Median seconds of ``fn()`` (CUDA synchronised), after warm-up; as many repeats as fit ``budget_s``."""
    fn()
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    repeats = int(min(most, max(3, budget_s / max(time.perf_counter() - start, 1e-6))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def conv_macs_per_image(model: torch.nn.Module, image_size: int) -> int:
    """Multiply-accumulates of every convolution for one image (hooks on a batch of 2)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in convs]
    with torch.no_grad():
        model(torch.rand(2, 3, image_size, image_size, device=next(model.parameters()).device))
    for handle in handles:
        handle.remove()
    return total // 2


# The calls into the project, one small function each (the APIs under issue 22 may still move).


def upload(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """As ``score_images`` does: uint8 ``[B, 3, S, S]`` to the device (pinned, non-blocking), float in [0, 1]."""
    from almdn_ray import scoring

    return scoring.upload(pixels, device)


def model_forward(model, images: torch.Tensor, bf16: bool):
    from almdn_ray import engine

    with torch.no_grad():
        return engine.forward(model, images, bf16=bf16)


def plain_forward(model, images: torch.Tensor, bf16: bool) -> dict:
    """The plain SSD as ``engine.forward`` runs SSD-GMM: channels_last on CUDA, bf16 autocast, float32 outputs."""
    if images.is_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16):
        outputs = model(images)
    return {k: v.float() for k, v in outputs.items()}


def model_predict(model, images: torch.Tensor, config) -> list:
    from almdn_ray import engine

    return engine.predict(model, images, config=config, batch_size=len(images), bf16=True)


def actor_score(model, image_ids: list[str], pixels: np.ndarray, config) -> dict:
    from almdn_ray import scoring

    return scoring.score_images(model, image_ids, decoded=(pixels, [None] * len(pixels)), config=config, bf16=True)


def run_score_pool(*, manifest: str, weights: str, out: str, spec, batch_size: int) -> None:
    from almdn_ray.distributed.score_pool import score_pool

    score_pool(
        manifest_uri=manifest, weights_uri=weights, out_uri=out, spec=spec, use_gpu=DEVICE.type == "cuda",
        batch_size=batch_size,
    )  # fmt: skip


def train(spec, dataset, recipe) -> tuple[torch.nn.Module, list[dict], float]:
    """``train_worker`` on CUDA in this process. Returns the model, its reports and the wall seconds."""
    from almdn_ray.training import LocalContext, train_worker

    context = LocalContext(device=DEVICE)
    start = time.perf_counter()
    model = train_worker(spec=spec, dataset=dataset, recipe=recipe, context=context)
    sync()
    return model, context.reports, time.perf_counter() - start


# Inputs


def photo_crop(index: int, width: int, height: int) -> np.ndarray:
    """A natural-looking ``[height, width, 3]`` uint8 image: a jittered crop of one of scikit-image's photos."""
    import importlib.util

    from PIL import Image, ImageEnhance

    folder = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    rng = np.random.default_rng(index)
    photo = Image.open(folder / PHOTOS[index % len(PHOTOS)]).convert("RGB")
    scale = rng.uniform(1.05, 1.6) * max(width / photo.width, height / photo.height)
    photo = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1))
    x, y = int(rng.integers(0, photo.width - width + 1)), int(rng.integers(0, photo.height - height + 1))
    crop = photo.crop((x, y, x + width, y + height))
    crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def _write_jpeg(job: tuple[Path, int]) -> None:
    from PIL import Image

    folder, index = job
    Image.fromarray(photo_crop(index, 500, 375)).save(folder / f"{index:06d}.jpg", quality=90)


def write_pool(folder: Path, count: int) -> str:
    """``count`` 500x375 JPEGs (VOC's size) and their manifest, as ``almdn-ray pool build`` writes it."""
    from concurrent.futures import ProcessPoolExecutor

    from almdn_ray.data.manifest import write_manifest

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_jpeg, [(folder, i) for i in range(count)], chunksize=32))
    rows = [(f"{i:06d}", str(folder / f"{i:06d}.jpg"), 500, 375) for i in range(count)]
    write_manifest(rows, str(folder / "manifest"), rows_per_shard=1000)
    return str(folder / "manifest")


def photo_pixels(count: int, size: int) -> np.ndarray:
    """``[count, 3, size, size]`` uint8 decoded photos, as ``decode_images`` hands them to the actor."""
    return np.stack([photo_crop(i, size, size).transpose(2, 0, 1) for i in range(count)])


class Squares(torch.utils.data.Dataset):
    """In-memory noise images with one or two coloured rectangles each (no decoding: the GPU step alone)."""

    def __init__(self, count: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(count, 3, size, size, generator=g) * 0.4
        self.targets = []
        for i in range(count):
            boxes = []
            for j in range(1 + i % 2):
                side = size // 5 + int(torch.randint(0, size // 5, (1,), generator=g))
                x, y = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
                self.images[i, j, y : y + side, x : x + side] = 1.0
                boxes.append([x, y, x + side, y + side])
            labels = torch.tensor([1 + j for j in range(len(boxes))])
            self.targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels})

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def quickstart_job(demo: Path):
    """The quickstart job spec with its dataset read from ``demo``; None when the demo data are missing."""
    import yaml

    from almdn_ray.config import spec_from_dict

    if not (demo / "pool.json").exists():
        return None
    data = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    data["dataset"].update(train=str(demo / "pool.json"), test=str(demo / "test.json"))
    return data, spec_from_dict(data, "jobs/quickstart.yaml")


def no_demo(args, part: str) -> None:
    print(
        f"{part}: no demo data at {args.demo} (python -m almdn_ray data demo {args.demo} --images 600 "
        "--test-images 200 --size 160)"
    )


def demo_pool(job):
    from almdn_ray.data.validate import read_dataset

    return read_dataset(job.dataset.train)


def scaled_recipe(recipe, iterations: int):
    from dataclasses import replace

    scale = iterations / recipe.max_iterations
    steps = tuple(max(1, round(s * scale)) for s in recipe.lr_steps)
    return replace(recipe, max_iterations=iterations, lr_steps=steps, checkpoint_every=iterations)


# The parts


def part_forward(args, deadline: Deadline) -> None:
    from almdn_ray import engine
    from almdn_ray.model import build_plain_ssd, build_ssdgmm

    device, batch = DEVICE, args.forward_batch
    torch.manual_seed(0)
    models = {
        "SSD300-GMM": (build_ssdgmm("ssd300_vgg16", num_classes=21, image_size=300), model_forward),
        "plain SSD300": (build_plain_ssd("ssd300_vgg16", num_classes=21, image_size=300), plain_forward),
    }
    images = torch.rand(batch, 3, 300, 300, device=device)
    print("| model | batch | precision | GFLOP/img | ms/batch | img/s | TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    rates = {}
    for name, (model, run) in models.items():
        model = engine.prepare_for_device(model, device).eval()
        flop = 2 * conv_macs_per_image(model, 300)
        for bf16 in (False, True):
            if deadline.left() < 5:
                print(f"| {name} | {batch} | {'bf16' if bf16 else 'fp32'} | skipped: time cap |")
                continue
            seconds = timed(lambda m=model, r=run, b=bf16: r(m, images, b))
            rates[name, bf16] = batch / seconds
            print(
                f"| {name} | {batch} | {'bf16' if bf16 else 'fp32'} | {flop / 1e9:.1f} | "
                f"{seconds * 1e3:.1f} | {batch / seconds:,.0f} | {batch / seconds * flop / 1e12:.0f} |",
                flush=True,
            )
    if ("SSD300-GMM", True) in rates and ("SSD300-GMM", False) in rates:
        print(f"a: SSD300-GMM bf16 / fp32: {rates['SSD300-GMM', True] / rates['SSD300-GMM', False]:.2f}x")
    if ("SSD300-GMM", True) in rates and ("plain SSD300", True) in rates:
        print(f"a: SSD300-GMM / plain SSD300 time, bf16: {rates['plain SSD300', True] / rates['SSD300-GMM', True]:.2f}")
    print("a: both precisions run channels_last (engine.prepare_for_device, engine.forward); TF32: see the header")
    if DEVICE.type == "cuda":
        print(f"a: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def score_split(model, pixels: np.ndarray, config) -> dict[str, float]:
    """Milliseconds per batch of each step of the actor's work, and detections per image."""
    device = next(model.parameters()).device
    ids = [str(i) for i in range(len(pixels))]
    images = upload(pixels, device)
    found = model_predict(model, images, config)
    ms = {
        "upload": timed(lambda: upload(pixels, device)),
        "forward": timed(lambda: model_forward(model, images, True)),
        "predict": timed(lambda: model_predict(model, images, config)),
        "total": timed(lambda: actor_score(model, ids, pixels, config)),
    }
    ms = {k: v * 1e3 for k, v in ms.items()}
    return {
        **ms,
        "post": ms["predict"] - ms["forward"],
        "summary": ms["total"] - ms["predict"] - ms["upload"],
        "detections": float(np.mean([len(d.scores) for d in found])),
    }


def demo_model(args, job_and_data, deadline: Deadline):
    """The small preset trained on the demo pool (the quickstart's recipe, ``--train-iterations``), its pixels."""
    from dataclasses import replace

    from almdn_ray import scoring
    from almdn_ray.data.transforms import DetectionDataset, eval_transform

    _, job = job_and_data
    pool = demo_pool(job)
    spec = replace(job.model, num_classes=pool.num_classes)
    recipe = scaled_recipe(job.train, args.train_iterations)
    dataset = DetectionDataset(pool.records, eval_transform(spec.input_size))
    model, _, seconds = train(spec, dataset, recipe)
    print(f"b: small preset: {recipe.max_iterations} iterations on {len(pool.records)} demo images in {seconds:.0f} s")
    pixels, _ = scoring.decode_images([r.uri for r in pool.records[: max(args.score_batches)]], spec.input_size)
    return model.eval(), spec, pixels


def part_scoring(args, deadline: Deadline) -> None:
    from almdn_ray import engine
    from almdn_ray.model import ModelSpec, PostprocessConfig

    config, device = PostprocessConfig(), DEVICE  # the paper's scoring settings
    cases = []
    job_and_data = quickstart_job(args.demo)
    if job_and_data is None:
        no_demo(args, "b")
        spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=11, image_size=128)
        pixels = photo_pixels(max(args.score_batches), spec.input_size)
    else:
        trained, spec, pixels = demo_model(args, job_and_data, deadline)
        cases.append((f"small {spec.input_size} px, trained on demo", trained, pixels, args.score_batches))
    torch.manual_seed(0)
    random_small = engine.prepare_for_device(spec.build(), device).eval()
    cases.append((f"small {spec.input_size} px, random weights", random_small, pixels, args.score_batches))
    big = engine.prepare_for_device(ModelSpec(preset="ssd300_vgg16", num_classes=21).build(), device).eval()
    cases.append(("SSD300-GMM 300 px, random weights", big, photo_pixels(64, 300), [64]))  # the 196 ms
    print("| model | batch | detections/img | upload ms | forward ms | post-proc. ms | summary ms | total ms | img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, source, batches in cases:
        for batch in batches:
            if deadline.left() < 10:
                print(f"| {name} | {batch} | skipped: time cap |")
                continue
            pixels_batch = np.ascontiguousarray(np.resize(source, (batch, *source.shape[1:])))  # repeats the images
            s = score_split(model, pixels_batch, config)
            print(
                f"| {name} | {batch} | {s['detections']:.1f} | {s['upload']:.1f} | {s['forward']:.1f} | "
                f"{s['post']:.1f} | {s['summary']:.1f} | {s['total']:.1f} | {batch / s['total'] * 1e3:,.0f} |",
                flush=True,
            )


def pool_model(args, spec, deadline: Deadline, workdir: Path) -> tuple[str, str]:
    """Weights for the pipeline's SSD300-GMM: trained briefly on the demo data so that its detections per
    image are those of a trained model, or random when the demo data are missing. Returns (path, what)."""
    from almdn_ray.data.transforms import DetectionDataset, eval_transform
    from almdn_ray.training import TrainRecipe

    weights = workdir / "ssd300-gmm.pt"
    job_and_data = quickstart_job(args.demo)
    torch.manual_seed(0)
    if job_and_data is None or args.pool_train_iterations == 0:
        torch.save(spec.build().state_dict(), weights)
        return str(weights), "random weights"
    pool = demo_pool(job_and_data[1])
    recipe = TrainRecipe(
        max_iterations=args.pool_train_iterations, batch_size=32, optimizer="adam", lr=1e-4, warmup_iterations=10,
        lr_steps=(), checkpoint_every=args.pool_train_iterations, grad_clip=10.0, augment=False, precise_bn_batches=0,
    )  # fmt: skip
    model, _, seconds = train(spec, DetectionDataset(pool.records, eval_transform(300)), recipe)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, weights)
    return str(weights), f"trained {recipe.max_iterations} iterations on the demo pool ({seconds:.0f} s)"


def part_pipeline(args, deadline: Deadline) -> None:
    import ray

    from almdn_ray import scoring
    from almdn_ray.model import ModelSpec

    workdir = args.workdir / "pipeline"
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest = write_pool(workdir / "jpegs", args.pool_images)
    print(f"c: {args.pool_images} JPEGs 500x375 written in {time.perf_counter() - start:.0f} s")
    spec = ModelSpec(preset="ssd300_vgg16", num_classes=21, image_size=300)
    weights, what = pool_model(args, spec, deadline, workdir)
    print(f"c: SSD300-GMM, 21 classes, 300 px, {what}")
    model = scoring.load_model(spec, weights, DEVICE)
    gpus = int(DEVICE.type == "cuda")
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines, in the table
    small = max(1, args.pool_images // 5)
    small_manifest = write_manifest_head(manifest, small, workdir / "manifest-small")
    try:
        print(f"c: steady img/s = ({args.pool_images} - {small}) images / (t[{args.pool_images}] - t[{small}]): the")
        print("c: actor start and model load, paid by both runs, drop out; whole = images / t of the large run")
        print("| batch | steady img/s | whole-run img/s | GPU busy % | detections/img | bare bf16 forward img/s "
              "| steady / forward |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for batch in args.pool_batches:
            if deadline.left() < 40:
                print(f"| {batch} | skipped: time cap |")
                continue
            images = torch.rand(batch, 3, 300, 300, device=DEVICE)
            bare = batch / timed(lambda x=images: model_forward(model, x, True))
            start = time.perf_counter()
            run_score_pool(
                manifest=small_manifest, weights=weights, out=str(workdir / "s"), spec=spec, batch_size=batch
            )
            t_small = time.perf_counter() - start
            out = str(workdir / f"scores-{batch}")
            busy = busy_sampler()
            start = time.perf_counter()
            run_score_pool(manifest=manifest, weights=weights, out=out, spec=spec, batch_size=batch)
            t_big = time.perf_counter() - start
            util = busy.stop() if busy else float("nan")
            steady = (args.pool_images - small) / max(t_big - t_small, 1e-9)
            detections = float(np.mean(scoring.read_scores(out).column("n_det").to_numpy()))
            row = f"{steady:,.0f} | {args.pool_images / t_big:,.0f} | {util:.0f} | {detections:.1f} | {bare:,.0f}"
            print(f"| {batch} | {row} | {steady / bare:.2f} |", flush=True)
    finally:
        ray.shutdown()


def write_manifest_head(manifest: str, rows: int, folder: Path) -> str:
    """A sealed manifest of the first ``rows`` rows of another."""
    from almdn_ray.data.manifest import read_manifest, write_manifest

    table = read_manifest(manifest).slice(0, rows)
    write_manifest(list(zip(*(table.column(c).to_pylist() for c in ("image_id", "uri", "width", "height")))),
                   str(folder))  # fmt: skip
    return str(folder)


def train_row(name: str, data: str, spec, dataset, recipe) -> None:
    _, reports, seconds = train(spec, dataset, recipe)
    steady = float(np.mean([r["images_per_s"] for r in reports[1:]] or [reports[-1]["images_per_s"]]))
    ms = recipe.batch_size / steady * 1e3
    row = f"{recipe.batch_size} | {recipe.max_iterations} | {ms:.1f} | {steady:,.0f} | {seconds:.1f}"
    print(f"| {name} | {data} | {row} |", flush=True)
    if name.startswith("small"):
        before = BASELINE_MS_PER_IT
        print(f"d: small preset, batch 8: {before:.0f} ms/it before / {ms:.1f} now = {before / ms:.1f}x")


def part_train(args, deadline: Deadline) -> None:
    from dataclasses import replace

    from almdn_ray.data.transforms import DetectionDataset, eval_transform
    from almdn_ray.model import ModelSpec
    from almdn_ray.training import TrainRecipe

    job_and_data = quickstart_job(args.demo)
    print("| model | data | batch | iterations | steady ms/it | steady img/s | wall s |")
    print("|---|---|---|---|---|---|---|")
    every = max(1, args.small_iterations // 10)
    if job_and_data is None:
        no_demo(args, "d")
        spec, data = ModelSpec(num_classes=3, image_size=128), Squares(256, 128)
        recipe = TrainRecipe(
            max_iterations=args.small_iterations, batch_size=8, optimizer="adam", lr=1e-3, warmup_iterations=0,
            lr_steps=(), checkpoint_every=every, augment=False, precise_bn_batches=0,
        )  # fmt: skip
        train_row("small 128 px", "synthetic", spec, data, recipe)
    else:
        job = job_and_data[1]
        pool = demo_pool(job)
        spec = replace(job.model, num_classes=pool.num_classes)
        recipe = replace(scaled_recipe(job.train, args.small_iterations), checkpoint_every=every, precise_bn_batches=0)
        data = DetectionDataset(pool.records, eval_transform(spec.input_size))
        train_row(f"small {spec.input_size} px (quickstart recipe)", "demo pool", spec, data, recipe)
    if deadline.left() < 20:
        print("| SSD300-GMM | skipped: time cap |")
        return
    spec = ModelSpec(preset="ssd300_vgg16", num_classes=21)
    recipe = TrainRecipe(
        max_iterations=args.ssd_iterations, batch_size=32, optimizer="sgd", lr=1e-4, warmup_iterations=0, lr_steps=(),
        checkpoint_every=max(1, args.ssd_iterations // 5), augment=False, precise_bn_batches=0,
    )  # fmt: skip
    train_row("SSD300-GMM 300 px, bf16", "synthetic, in memory", spec, Squares(128, 300), recipe)


def part_run(args, deadline: Deadline) -> None:
    import yaml

    from almdn_ray.state import load_state

    job_and_data = quickstart_job(args.demo)
    if job_and_data is None:
        no_demo(args, "e")
        return
    data, _ = job_and_data
    run_uri = args.workdir / "run"
    shutil.rmtree(run_uri, ignore_errors=True)
    iterations = args.run_iterations
    data["storage"]["uri"] = str(run_uri)
    data["resources"]["use_gpu"] = DEVICE.type == "cuda"
    data["acquisition"]["cycles"] = args.run_cycles
    data["resources"]["scoring_batch_size"] = None  # the device's default
    data["train"]["data_workers"] = None
    scale = iterations / data["train"]["max_iterations"]
    data["train"].update(
        max_iterations=iterations,
        lr_steps=[max(1, round(s * scale)) for s in data["train"]["lr_steps"]],
        checkpoint_every=max(1, round(data["train"]["checkpoint_every"] * scale)),
    )
    job_file = args.workdir / "gpu-run.yaml"
    job_file.write_text(yaml.safe_dump(data, sort_keys=False))
    gpu = str(data["resources"]["use_gpu"]).lower()
    print(f"e: quickstart job, use_gpu: {gpu}, {args.run_cycles} cycles of {iterations} iterations: {job_file}")
    log = args.workdir / "run.log"
    start = time.perf_counter()
    with open(log, "w") as stream:
        code = run_capped(
            [sys.executable, "-m", "almdn_ray", "run", str(job_file)], deadline.left() - 10, stdout=stream, cwd=ROOT
        )
    print(f"e: almdn-ray run: exit {code} in {time.perf_counter() - start:.0f} s (log: {log})")
    if code != 0:
        print("".join(log.read_text().splitlines(keepends=True)[-15:]))
    state = load_state(str(run_uri))
    history = state.history if state is not None else []
    print("| cycle | stage | seconds |")
    print("|---|---|---|")
    for entry in history:
        print(f"| {entry['cycle']} | {entry['stage']} | {entry['seconds']:.1f} |")
    for stage in ("train", "eval", "score", "select", "label"):
        seconds = [h["seconds"] for h in history if h["stage"] == stage]
        if seconds:
            print(f"e: {stage}: {len(seconds)} x, mean {np.mean(seconds):.1f} s")
    trains = [h["seconds"] for h in history if h["stage"] == "train"]
    if trains:
        print(f"e: train: {min(trains) / iterations * 1e3:.0f} ms/it with Ray Train's start-up (before: 118 ms/it)")


RUNNERS = {"a": part_forward, "b": part_scoring, "c": part_pipeline, "d": part_train, "e": part_run}


def run_capped(command: list[str], cap_s: float, **popen) -> int | None:
    """Run ``command`` in a session of its own; past ``cap_s``: SIGINT to its process group, then SIGKILL.
    Returns its exit code, or None when it was stopped."""
    process = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        return process.wait(timeout=max(cap_s, 1))
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=grace)
                break
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
        return None


def run_part(part: str, args, cap_s: float) -> None:
    """One part in this process (the child): its own exceptions are printed, not raised."""
    torch.manual_seed(0)
    try:
        RUNNERS[part](args, Deadline(cap_s - 5))
    except KeyboardInterrupt:  # the parent's SIGINT at the time cap
        print(f"{part}: interrupted at its time cap", flush=True)
        sys.exit(1)
    except Exception:
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
        sys.exit(1)


def header() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ray = f"ray {version('ray')}"
    except PackageNotFoundError:
        ray = "no ray"
    where = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {ray}"
    if DEVICE.type == "cpu":
        return f"# bench/gpu.py — {where}, --device cpu: a check that the script runs, not a measurement"
    if not torch.cuda.is_available():
        return f"# bench/gpu.py — {where}, no CUDA device: dry run"
    tf32 = f"TF32 convolutions {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}"
    return f"# bench/gpu.py — {torch.cuda.get_device_name()}, {where}, {tf32}"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="a,b,c,d,e", help="comma-separated letters: " + str(PARTS))
    parser.add_argument("--budget-s", type=float, default=sum(CAPS_S.values()), help="the parts' caps scale to it")
    parser.add_argument("--demo", type=Path, default=ROOT / "data" / "demo", help="demo data (almdn-ray data demo)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/almdn-gpu-bench"))
    parser.add_argument("--forward-batch", type=int, default=256)
    parser.add_argument("--train-iterations", type=int, default=300, help="b: the small preset on the demo pool")
    parser.add_argument("--score-batches", type=_ints, default=[64, 256])
    parser.add_argument("--pool-images", type=int, default=10000)
    parser.add_argument("--pool-batches", type=_ints, default=[128, 256])
    parser.add_argument("--pool-train-iterations", type=int, default=100, help="c: SSD300-GMM on the demo pool")
    parser.add_argument("--small-iterations", type=int, default=200)
    parser.add_argument("--ssd-iterations", type=int, default=60)
    parser.add_argument("--run-iterations", type=int, default=150)
    parser.add_argument("--run-cycles", type=int, default=2)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: check the script runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cap-s", type=float, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    global DEVICE
    args = parse_args()
    DEVICE = torch.device(args.device)
    args.demo, args.workdir = args.demo.resolve(), args.workdir.resolve()
    if args.child:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run_part(args.child, args, args.cap_s)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {unknown}; choose from {PARTS}")
    print(header(), flush=True)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        for part in parts:
            print(f"{part}: no CUDA")
        return
    scale = args.budget_s / sum(CAPS_S[p] for p in parts)
    started = time.perf_counter()
    for part in parts:
        cap = CAPS_S[part] * scale
        print(f"\n{part}: {PARTS[part]} (cap {cap:.0f} s)", flush=True)
        start = time.perf_counter()
        code = run_capped([sys.executable, __file__, *sys.argv[1:], "--child", part, "--cap-s", f"{cap:.0f}"], cap)
        took = time.perf_counter() - start
        outcome = {None: "stopped at its time cap", 0: "done"}.get(code, f"failed (exit {code})")
        print(f"{part}: {outcome} in {took:.0f} s", flush=True)
    print(f"\nbench/gpu.py: parts {','.join(parts)} in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
