"""The same model on CUDA and on the CPU (skipped without a CUDA device), and the GPU-shaped Ray paths.

TF32: cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa), which production keeps (the GPU
paths run under bf16 autocast anyway). A float32 comparison with the CPU turns it off for its own duration,
so that both devices compute in float32 and differ only by summation order.
"""

import contextlib

import numpy as np
import pytest
import torch

from almdn_ray import engine
from almdn_ray.model import ModelSpec, MultiboxMixtureLoss, PostprocessConfig, build_ssdgmm
from almdn_ray.training import LocalContext, TrainRecipe, train_worker
from tests.test_engine import Pairs, make_images

pytestmark = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def float32_exactly():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_detections_agree(cpu, gpu, threshold: float, margin: float = 1e-3):
    """Detections well clear of the confidence threshold agree: same classes, boxes and scores (near-ties at
    the threshold may fall either way on either device, so they are not compared)."""
    compared = 0
    for a, b in zip(cpu, gpu):
        for x, y in ((a, b), (b, a)):
            clear = x.scores >= threshold + margin
            for box, label, score in zip(x.boxes[clear], x.labels[clear], x.scores[clear]):
                same = (y.labels == label) & ((y.boxes - box).abs().amax(dim=1) < 1e-2)
                assert same.any(), f"detection {label.item()} at {box.tolist()} ({score.item():.4f}) missing"
                assert (y.scores[same] - score).abs().min() < 1e-3
                compared += 1
    assert compared > 0


@needs_cuda
def test_cuda_matches_cpu_for_loss_and_detections():
    torch.manual_seed(0)
    model = build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, image_size=160).eval()
    images = torch.rand(2, 3, 160, 160)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}] * 2
    noise = torch.randn(2, model(images).anchors.shape[0], 4, 3)
    loss_fn = MultiboxMixtureLoss()
    config = PostprocessConfig(min_confidence=0.3)
    with torch.no_grad(), float32_exactly():
        cpu_loss = loss_fn(model(images), targets, noise=noise).total
        cpu_dets = engine.predict(model, images, config=config)
        gpu_model = model.to("cuda")
        gpu_targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
        gpu_loss = loss_fn(gpu_model(images.cuda()), gpu_targets, noise=noise.cuda()).total
        gpu_dets = engine.predict(gpu_model, images, config=config)
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-4, atol=1e-4)
    assert_detections_agree(cpu_dets, gpu_dets, config.min_confidence)


@needs_cuda
def test_bf16_channels_last_training_step_and_scoring_on_cuda():
    images, targets = make_images(4, seed=1)
    spec_kwargs = dict(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=160)
    recipe = TrainRecipe(
        max_iterations=20, batch_size=4, optimizer="adam", lr=1e-3, warmup_iterations=0, lr_steps=(),
        checkpoint_every=10, augment=False, precise_bn_batches=0,
    )  # fmt: skip
    context = LocalContext(device=torch.device("cuda"))
    model = train_worker(spec=ModelSpec(**spec_kwargs), dataset=Pairs(images, targets), recipe=recipe, context=context)
    assert engine.use_bf16(context.device, True) and not engine.use_bf16("cpu", True)
    assert next(model.parameters()).is_cuda and all(r["loss"] == r["loss"] for r in context.reports)  # no NaN
    model.eval()
    config = PostprocessConfig(min_confidence=0.0)
    fp32 = engine.predict(model, images, config=config)
    bf16 = engine.predict(model, images, config=config, bf16=True)
    for a, b in zip(fp32, bf16):
        assert abs(len(a.scores) - len(b.scores)) <= max(2, len(a.scores) // 10)


@needs_cuda
def test_batched_postprocess_on_cuda_equals_the_cpu():
    from almdn_ray.model.anchors import make_box_coder
    from almdn_ray.model.postprocess import postprocess
    from tests.model.test_postprocess import random_batch

    out = random_batch(8)
    kwargs = dict(box_coder=make_box_coder(), image_size=(96, 96), config=PostprocessConfig(min_confidence=0.3))
    cpu = postprocess(out, **kwargs)
    gpu = postprocess(type(out)(*(t.cuda() for t in out)), **kwargs)
    assert sum(len(d.scores) for d in cpu) > 100
    for a, b in zip(cpu, gpu):
        assert a.labels.tolist() == b.labels.tolist()
        for field in a._fields:
            torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gpu_ray():
    """Ray with this machine's GPU (and no S3 server: the GPU machine may have none)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_no_progress_timeout_s = 120
    yield ray
    if started:
        ray.shutdown()


@needs_cuda
def test_score_pool_on_the_gpu_selects_as_the_cpu_does(gpu_ray, tmp_path):
    """One GPU actor (bf16, batched post-processing, two batches in flight) with decode in CPU tasks, against
    the same model in one CPU process: every row once, counts equal but for near-ties, the same top picks."""
    from almdn_ray.data.manifest import read_manifest, rows_from_dataset, write_manifest
    from almdn_ray.data.records import Dataset
    from almdn_ray.distributed.score_pool import score_pool
    from almdn_ray.scoring import load_model, read_scores, score_table, select_from_scores
    from tests.distributed.helpers import SIZE, write_scenes

    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=SIZE)
    records = write_scenes(tmp_path / "images", 40, seed=4, corrupt=(3,))
    torch.manual_seed(0)
    torch.save(spec.build().state_dict(), tmp_path / "model.pt")
    write_manifest(rows_from_dataset(Dataset(records, ("red", "blue"))), str(tmp_path / "pool"), rows_per_shard=20)
    config = PostprocessConfig(min_confidence=0.2)
    out = score_pool(
        manifest_uri=str(tmp_path / "pool"), weights_uri=str(tmp_path / "model.pt"), out_uri=str(tmp_path / "s"),
        spec=spec, postprocess=config, use_gpu=True, mixed_precision=False, batch_size=16, rows_per_block=8,
    )  # fmt: skip
    gpu = read_scores(out).sort_by("image_id")
    cpu = score_table(
        load_model(spec, str(tmp_path / "model.pt")), read_manifest(str(tmp_path / "pool")), config=config
    )
    cpu = cpu.sort_by("image_id")
    assert gpu.column("image_id").to_pylist() == cpu.column("image_id").to_pylist()
    assert gpu.column("error").to_pylist() == cpu.column("error").to_pylist()
    n_gpu, n_cpu = np.array(gpu.column("n_det")), np.array(cpu.column("n_det"))
    assert np.abs(n_gpu - n_cpu).max() <= max(2, n_cpu.max() // 20), (n_gpu, n_cpu)
    assert set(select_from_scores(gpu, 5).image_ids) & set(select_from_scores(cpu, 5).image_ids)


@needs_cuda
def test_ray_train_on_the_gpu_trains_as_the_cpu_does(gpu_ray, tmp_path):
    """One Ray Train worker on the GPU (NCCL) against the same recipe in one CPU process: the same number of
    steps, the loss falls on both, within 10 % of each other at the end."""
    from almdn_ray.data.transforms import DetectionDataset, eval_transform
    from almdn_ray.distributed.train import train_distributed
    from tests.distributed.helpers import SIZE, write_scenes

    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=SIZE)
    records = write_scenes(tmp_path / "images", 8)
    recipe = TrainRecipe(
        max_iterations=40, batch_size=4, lr=0.02, warmup_iterations=2, lr_steps=(), checkpoint_every=20,
        augment=False, precise_bn_batches=2, divergence_factor=1e6,
    )  # fmt: skip
    result = train_distributed(
        records=records, spec=spec, recipe=recipe, storage_uri=str(tmp_path / "train"), run_name="cycle-000",
        num_workers=1, use_gpu=True, mixed_precision=False,
    )  # fmt: skip
    context = LocalContext()
    dataset = DetectionDataset(records, eval_transform(spec.input_size))
    train_worker(spec=spec, dataset=dataset, recipe=recipe, context=context)
    gpu, cpu = result.metrics, context.reports[-1]
    assert gpu["iteration"] == cpu["iteration"] == 40
    assert gpu["loss"] < 0.8 * gpu["initial_loss"] and cpu["loss"] < 0.8 * cpu["initial_loss"]
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=0.1)
