"""Pool scoring through Ray Data against the same model in a plain loop, and the pool reduce at 10M rows.

Side by side in one run, on the same images and model:
1. images/s of ``distributed.score_pool`` (Ray Data, actor pool, Parquet in and out) divided by images/s of
   ``scoring.score_table`` (one process), at 1k and 10k small pool images. Target: >= 0.85.
2. ``reduce.select_from_scores`` (the pool reduce + top-budget selection) over 10 million synthetic
   per-image rows: seconds and peak memory. Target: < 10 s and < 3 GB.
3. The stage split on 500x375 JPEGs (VOC's size), per core: decode + resize alone, the model pass alone
   (forward + per-image summary on pre-decoded pixels), and the Ray Data pipeline with decoding in the model
   actors (the CPU default) beside decoding in CPU tasks ahead of them (the GPU default). On a CUDA machine
   the forward and the pipeline are also measured on the GPU (bf16), with the GPU's busy share.
4. The scoring pass with the 128-dim image and per-detection embeddings against without (``almdn_diverse``'s
   cost): img/s side by side, and the score Parquet's bytes per image.

    python bench/scoring.py [--sizes 1000 10000] [--image-size 64] [--reduce-rows 10000000] [--stage-images 400]
        [--embedding-images 200] [--only-embeddings]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from almdn_ray import acquisition, reduce  # noqa: E402  (torch-free: the reduce's process stays small)


def write_pool(folder: Path, count: int, size: int) -> str:
    from PIL import Image

    from almdn_ray.data.manifest import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        path = folder / f"{i:06d}.png"
        image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(image).save(path, compress_level=1)
        rows.append((f"{i:06d}", str(path), size, size))
    write_manifest(rows, str(folder / "manifest"), rows_per_shard=2000)
    return str(folder / "manifest")


def bench_throughput(sizes: list[int], image_size: int, workdir: Path) -> None:
    import ray
    import torch

    from almdn_ray import scoring
    from almdn_ray.data.manifest import read_manifest
    from almdn_ray.distributed.score_pool import score_pool
    from almdn_ray.model import ModelSpec, PostprocessConfig

    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=11, image_size=image_size)
    torch.manual_seed(0)
    weights = workdir / "model.pt"
    torch.save(spec.build().state_dict(), weights)
    config = PostprocessConfig()
    ray.init(
        address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR"
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    print("| pool images | plain loop img/s | Ray Data img/s | ratio |")
    print("|---|---|---|---|")
    seconds = {}
    for count in sizes:
        manifest = write_pool(workdir / f"pool{count}", count, 48)
        model = scoring.load_model(spec, str(weights))
        start = time.perf_counter()
        plain = scoring.score_table(model, read_manifest(manifest), batch_size=32, config=config)
        loop_rate = count / (time.perf_counter() - start)
        start = time.perf_counter()
        out = score_pool(
            manifest_uri=manifest,
            weights_uri=str(weights),
            out_uri=str(workdir / f"scores{count}"),
            spec=spec,
            postprocess=config,
            batch_size=32,
            rows_per_block=500,
        )
        ray_rate = count / (time.perf_counter() - start)
        assert scoring.read_scores(out).num_rows == plain.num_rows == count
        seconds[count] = (count / loop_rate, count / ray_rate)
        print(f"| {count} | {loop_rate:.0f} | {ray_rate:.0f} | {ray_rate / loop_rate:.2f} |")
    ray.shutdown()
    if len(sizes) > 1:  # the rate of the extra images: Ray Data's fixed start-up cost (~10 s) cancels out
        small, large = min(sizes), max(sizes)
        loop_rate = (large - small) / (seconds[large][0] - seconds[small][0])
        ray_rate = (large - small) / (seconds[large][1] - seconds[small][1])
        print(f"| marginal {small}->{large} | {loop_rate:.0f} | {ray_rate:.0f} | {ray_rate / loop_rate:.2f} |")


def write_jpegs(folder: Path, count: int) -> str:
    from PIL import Image

    from almdn_ray.data.manifest import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    base = (rng.random((375, 500, 3)) * 255).astype(np.uint8)
    rows = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(np.roll(base, i * 7, axis=1)).save(path, quality=90)
        rows.append((f"{i:06d}", str(path), 500, 375))
    write_manifest(rows, str(folder / "manifest"), rows_per_shard=100)
    return str(folder / "manifest")


def bench_stages(count: int, workdir: Path, image_size: int = 320) -> None:
    """Images/s per core of each scoring stage, and of the two pipeline shapes, side by side."""
    import ray
    import torch

    from almdn_ray import scoring
    from almdn_ray.data.manifest import read_manifest
    from almdn_ray.distributed.score_pool import score_pool
    from almdn_ray.model import ModelSpec

    cores = os.cpu_count() or 1
    manifest = write_jpegs(workdir / "jpegs", count)
    uris = read_manifest(manifest).column("uri").to_pylist()
    ids = read_manifest(manifest).column("image_id").to_pylist()
    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=21, image_size=image_size)
    torch.manual_seed(0)
    weights = workdir / "stage-model.pt"
    torch.save(spec.build().state_dict(), weights)
    torch.set_num_threads(1)
    start = time.perf_counter()
    decoded = scoring.decode_images(uris, image_size)
    decode_rate = count / (time.perf_counter() - start)
    model = scoring.load_model(spec, str(weights))
    batch = 16
    start = time.perf_counter()
    for i in range(0, count, batch):
        part = (decoded[0][i : i + batch], decoded[1][i : i + batch])
        scoring.score_images(model, ids[i : i + batch], decoded=part)
    forward_rate = count / (time.perf_counter() - start)
    torch.set_num_threads(cores)
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    rates = {}
    for split in (False, True):
        start = time.perf_counter()
        score_pool(
            manifest_uri=manifest, weights_uri=str(weights), out_uri=str(workdir / f"stage-scores-{split}"),
            spec=spec, batch_size=batch, rows_per_block=50, split_decode=split,
        )  # fmt: skip
        rates[split] = count / (time.perf_counter() - start)
    ray.shutdown()
    print(f"stage split, {count} JPEGs 500x375 -> {image_size}px, small preset, batch {batch}, {cores} CPUs:\n")
    print("| stage | img/s | img/s per core |")
    print("|---|---|---|")
    print(f"| decode + resize (1 thread) | {decode_rate:.0f} | {decode_rate:.0f} |")
    print(f"| forward + summary (1 thread) | {forward_rate:.0f} | {forward_rate:.0f} |")
    for split, label in (
        (False, "pipeline, decode in the model actors (CPU default)"),
        (True, "pipeline, decode in CPU tasks (GPU default)"),
    ):
        print(f"| {label} | {rates[split]:.0f} | {rates[split] / cores:.1f} |")
    print(f"\nsplit / fused pipeline on CPU: {rates[True] / rates[False]:.2f}")
    if not torch.cuda.is_available():
        print("no CUDA device here")
    print("GPU rows (forward and pipeline in bf16, GPU busy %) are not measured by this script yet\n")


def bench_embeddings(count: int, workdir: Path, image_size: int = 320, rounds: int = 3) -> None:
    """The scoring pass with the image and per-detection embeddings (``almdn_diverse``) against without them:
    forward + summary on the same pre-decoded pixels, alternating, and the score Parquet's bytes per image."""
    import pyarrow.parquet as pq
    import torch

    from almdn_ray import scoring
    from almdn_ray.data.manifest import read_manifest
    from almdn_ray.model import ModelSpec
    from almdn_ray.model.postprocess import PostprocessConfig

    manifest = write_jpegs(workdir / "embedding-jpegs", count)
    uris = read_manifest(manifest).column("uri").to_pylist()
    ids = read_manifest(manifest).column("image_id").to_pylist()
    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=21, image_size=image_size)
    torch.manual_seed(0)
    model = spec.build().eval()
    torch.set_num_threads(1)
    decoded = scoring.decode_images(uris, image_size)
    # an untrained model detects little at 0.5: keep its detections down to 0.05 so that each image has the
    # eight per-detection embeddings of a busy scene
    config = PostprocessConfig(min_confidence=0.05)
    embedder, batch = scoring.Embedder(128), 16
    seconds = {"without": 0.0, "with": 0.0}
    tables = {}
    for _ in range(rounds):
        for name, with_embeddings in (("without", None), ("with", embedder)):
            start, parts = time.perf_counter(), []
            for i in range(0, count, batch):
                part = (decoded[0][i : i + batch], decoded[1][i : i + batch])
                rows = scoring.score_images(
                    model, ids[i : i + batch], decoded=part, config=config, embedder=with_embeddings
                )
                parts.append(pa.Table.from_pydict(rows, schema=reduce.SCORE_SCHEMA))
            seconds[name] += time.perf_counter() - start
            tables[name] = pa.concat_tables(parts)
    sizes = {}
    for name, table in tables.items():
        path = workdir / f"embedding-{name}.parquet"
        pq.write_table(table, path)
        sizes[name] = path.stat().st_size / count
    detections = np.asarray(tables["with"].column("n_det"))
    print(f"embeddings in the scoring pass, {count} JPEGs -> {image_size}px, small preset, 128 dims, 1 thread, "
          f"{rounds} alternating rounds; detections per image: median {np.median(detections):.0f}:\n")  # fmt: skip
    print("| scoring pass | img/s | score Parquet bytes / image |")
    print("|---|---|---|")
    for name in ("without", "with"):
        print(f"| {name} embeddings | {count * rounds / seconds[name]:.1f} | {sizes[name]:.0f} |")
    print(f"\nwith / without embeddings, time: {seconds['with'] / seconds['without']:.3f}\n")


def synthetic_outputs(anchors, batch: int, candidates: int, classes: int = 21, seed: int = 0):
    """Head outputs for ``batch`` images in which ``candidates`` anchors per image (in clusters of overlapping
    default boxes, as objects give) are confident of a foreground class; the rest is background."""
    import torch

    from almdn_ray.model import MixtureOutputs

    g = torch.Generator().manual_seed(seed)
    a, k = anchors.shape[0], 4
    logits = torch.randn(batch, a, k, classes, generator=g)
    logits[..., 0] += 6.0  # background everywhere ...
    for i in range(batch):
        chosen = torch.randperm(a, generator=g)[:candidates]
        label = torch.randint(1, classes, (candidates,), generator=g)
        logits[i, chosen[:, None], torch.arange(k), label[:, None]] += 9.0  # ... but here
    return MixtureOutputs(
        torch.randn(batch, a, k, 4, generator=g) * 0.3,
        torch.randn(batch, a, k, 4, generator=g),
        torch.randn(batch, a, k, 4, generator=g),
        logits,
        torch.randn(batch, a, k, classes, generator=g),
        torch.randn(batch, a, k, generator=g),
        anchors,
    )


def bench_postprocess(batch: int = 64, rounds: int = 3) -> None:
    """Post-processing of one scoring batch (SSD300's 8,732 default boxes, 21 classes, the paper's scoring
    settings), today's batched device path against the per-image loop it replaced, side by side."""
    import torch

    from almdn_ray.model import PostprocessConfig, build_ssdgmm
    from almdn_ray.model.anchors import make_box_coder
    from almdn_ray.model.postprocess import image_summaries, postprocess_batch, postprocess_reference

    torch.manual_seed(0)
    with torch.no_grad():
        anchors = build_ssdgmm("ssd300_vgg16", num_classes=21).eval()(torch.zeros(1, 3, 300, 300)).anchors
    kwargs = dict(box_coder=make_box_coder(), image_size=(300, 300), config=PostprocessConfig())

    def per_image(outputs):
        found = postprocess_reference(outputs, **kwargs)
        index, values, entropy = acquisition.detection_values(found)
        acquisition.summarize(index, values, batch, entropy)
        return sum(len(d.scores) for d in found)

    def batched(outputs):
        found = postprocess_batch(outputs, **kwargs)
        values = torch.stack([found.loc_al, found.loc_ep, found.cls_al, found.cls_ep], dim=1)
        columns = image_summaries(found.image, values, batch, acquisition.TERMS)
        torch.stack(list(columns.values()), dim=1).cpu()
        return found.image.numel()

    print(f"\n# post-processing of a batch of {batch} (SSD300 boxes, 21 classes), {torch.get_num_threads()} threads")
    print("| detections / image | per-image loop ms / image | batched ms / image | speed-up |")
    print("|---|---|---|---|")
    for candidates in (12, 900):  # about 10 and 800 detections per image
        outputs = synthetic_outputs(anchors, batch, candidates)
        with torch.no_grad():
            found = batched(outputs)
            assert found == per_image(outputs)  # the same detections
            times = {"loop": [], "batched": []}
            for _ in range(rounds):  # alternated, so that the machine's noise falls on both
                for name, fn in (("loop", per_image), ("batched", batched)):
                    start = time.perf_counter()
                    fn(outputs)
                    times[name].append(time.perf_counter() - start)
        loop, fast = (min(times[n]) * 1e3 / batch for n in ("loop", "batched"))
        print(f"| {found / batch:.0f} | {loop:.3f} | {fast:.3f} | {loop / fast:.1f}x |")


def bench_reduce(rows: int, budget: int = 1000) -> None:
    """Write 10M synthetic score rows to Parquet, then time the reduce in a fresh process (clean peak RSS)."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n_det = rng.integers(0, 6, rows)
    columns = {
        "image_id": pa.array(np.char.add("img-", np.arange(rows).astype(str)).astype(object)),
        "n_det": pa.array(n_det),
    }
    columns["committee_n"] = pa.array(np.zeros(rows, np.int64))  # an almdn run writes no committee values
    for term in acquisition.TERMS + acquisition.COMMITTEE_TERMS:
        maxima = rng.random(rows) if term in acquisition.TERMS else np.full(rows, -np.inf)
        columns[f"{term}_max"] = pa.array(np.where(n_det > 0, maxima, -np.inf))
        columns[f"{term}_sum"] = pa.array(np.nan_to_num(maxima, neginf=0.0) * n_det * 0.7)
        columns[f"{term}_sumsq"] = pa.array(np.nan_to_num(maxima, neginf=0.0) ** 2 * n_det * 0.6)
    columns["entropy_max"] = pa.array(rng.random(rows))
    columns["top_class"] = pa.array(rng.integers(-1, 5, rows))
    columns["embedding"] = pa.nulls(rows, pa.binary())  # almdn reads none of them
    columns["det_embedding"] = pa.nulls(rows, pa.binary())
    columns["seconds"] = pa.array(rng.random(rows) * 0.01)
    columns["error"] = pa.nulls(rows, pa.string())
    columns["worker"] = pa.nulls(rows, pa.string())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "part-0.parquet")
        pq.write_table(pa.table(columns).select(reduce.SCORE_SCHEMA.names).cast(reduce.SCORE_SCHEMA), path)
        del columns
        child = subprocess.run(
            [sys.executable, __file__, "--reduce-file", folder, "--budget", str(budget)],
            capture_output=True,
            text=True,
            check=True,
        )
    print(child.stdout.strip() + "\n")


def high_water_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1e6


def reduce_file(folder: str, budget: int) -> None:
    """The product's path in a fresh process: read the scores folder, reduce, select."""
    baseline = high_water_gb()
    start = time.perf_counter()
    table = reduce.read_scores(folder, "almdn")  # the columns the driver reads for almdn
    loaded = high_water_gb()
    selection = reduce.select_from_scores(table, budget)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    assert len(selection.image_ids) == budget
    print(
        f"read + reduce + selection of {budget} over {table.num_rows:,} rows: {seconds:.2f} s; peak RSS "
        f"{peak:.2f} GB (imports alone {baseline:.2f} GB, after reading {loaded:.2f} GB; "
        f"the table {table.nbytes / 1e9:.2f} GB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--image-size", type=int, default=96, help="model input side")
    parser.add_argument("--reduce-rows", type=int, default=10_000_000)
    parser.add_argument("--stage-images", type=int, default=400, help="JPEGs for the stage split (0: skip)")
    parser.add_argument("--embedding-images", type=int, default=200, help="JPEGs for the embedding cost (0: skip)")
    parser.add_argument("--only-embeddings", action="store_true", help="measure the embedding cost alone")
    parser.add_argument("--only-postprocess", action="store_true", help="measure post-processing alone")
    parser.add_argument("--reduce-file", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only_postprocess:
        bench_postprocess()
        return
    if args.reduce_file:
        reduce_file(args.reduce_file, args.budget)
        return
    print(f"# bench/scoring.py — {platform.machine()}, {os.cpu_count()} CPUs")
    if not args.only_embeddings:
        bench_reduce(args.reduce_rows)  # first, so that the peak memory it reports is not Ray's
    with tempfile.TemporaryDirectory() as folder:
        if args.embedding_images:
            bench_embeddings(args.embedding_images, Path(folder))
        if args.only_embeddings:
            return
        if args.stage_images:
            bench_stages(args.stage_images, Path(folder))
        bench_throughput(args.sizes, args.image_size, Path(folder))


if __name__ == "__main__":
    main()
