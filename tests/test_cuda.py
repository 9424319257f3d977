"""The same model on CUDA and on the CPU (skipped without a CUDA device)."""

import pytest
import torch

from almdn_ray import engine
from almdn_ray.model import MultiboxMixtureLoss, PostprocessConfig, build_ssdgmm

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
