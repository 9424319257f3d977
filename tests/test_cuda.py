"""The same model on CUDA and on the CPU (skipped without a CUDA device)."""

import pytest
import torch

from almdn_ray import engine
from almdn_ray.model import ModelSpec, MultiboxMixtureLoss, PostprocessConfig, build_ssdgmm
from almdn_ray.training import LocalContext, TrainRecipe, train_worker
from tests.test_engine import Pairs, make_images

pytestmark = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_matches_cpu_for_loss_and_detections():
    torch.manual_seed(0)
    model = build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, image_size=160).eval()
    images = torch.rand(2, 3, 160, 160)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}] * 2
    noise = torch.randn(2, model(images).anchors.shape[0], 4, 3)
    loss_fn = MultiboxMixtureLoss()
    with torch.no_grad():
        cpu_loss = loss_fn(model(images), targets, noise=noise).total
        cpu_dets = engine.predict(model, images, config=PostprocessConfig(min_confidence=0.3))
        gpu_model = model.to("cuda")
        gpu_targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
        gpu_loss = loss_fn(gpu_model(images.cuda()), gpu_targets, noise=noise.cuda()).total
        gpu_dets = engine.predict(gpu_model, images, config=PostprocessConfig(min_confidence=0.3))
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-3, atol=1e-3)
    for a, b in zip(cpu_dets, gpu_dets):
        assert a.labels.tolist() == b.labels.tolist()
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-3, atol=1e-3)


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
