import math
import sys

import pytest
import torch

from almdn_ray import mdn
from almdn_ray.model import MixtureOutputs, PostprocessConfig, postprocess
from almdn_ray.model.anchors import make_box_coder

ANCHORS = torch.tensor([[10.0, 10.0, 30.0, 30.0], [12.0, 10.0, 32.0, 30.0], [60.0, 60.0, 90.0, 90.0]])


def outputs(class_logits):
    """K=2 components that agree on the class logits of each anchor but disagree a little on boxes."""
    a, c = len(class_logits), len(class_logits[0])
    logits = torch.tensor(class_logits).unsqueeze(1).repeat(1, 2, 1)  # [A, K, C]
    logits[:, 1, 1] += 0.5  # some class epistemic uncertainty
    loc_mu = torch.zeros(a, 2, 4)
    loc_mu[:, 1] = 0.2
    loc_sigma_logit = torch.linspace(-2, 2, a * 2 * 4).view(a, 2, 4)
    return MixtureOutputs(
        loc_mu[None],
        loc_sigma_logit[None],
        torch.zeros(1, a, 2, 4),
        logits[None],
        torch.full((1, a, 2, c), -1.0),
        torch.zeros(1, a, 2),
        ANCHORS,
    )


def test_detection_carries_the_mixture_uncertainties():
    big = 8.0
    out = outputs([[0.0, big, 0.0], [0.0, 0.0, 0.0], [big, 0.0, 0.0]])  # only anchor 0 is confident (class 1)
    (det,) = postprocess(out, box_coder=make_box_coder(), image_size=(100, 100))
    assert det.labels.tolist() == [1]
    mean, loc_al, loc_ep = mdn.localization_moments(out.loc_mu[0, 0], out.loc_sigma_logit[0, 0], out.loc_pi_logit[0, 0])
    probs, cls_al, cls_ep = mdn.classification_moments(
        out.cls_logits[0, 0], out.cls_sigma_logit[0, 0], out.cls_pi_logit[0, 0]
    )
    assert det.scores.item() == pytest.approx(probs[1].item())
    assert det.loc_al.item() == pytest.approx(loc_al.max().item())
    assert det.loc_ep.item() == pytest.approx(loc_ep.max().item())
    assert det.cls_al.item() == pytest.approx(cls_al[1].item())
    assert det.cls_ep.item() == pytest.approx(cls_ep[1].item()) and det.cls_ep.item() > 0
    assert det.entropy.item() == pytest.approx(-(probs * probs.log()).sum().item(), rel=1e-5)
    torch.testing.assert_close(det.boxes[0], make_box_coder().decode_single(mean[None], ANCHORS[:1])[0])


def test_nms_is_per_class_and_confidence_is_filtered():
    big = 6.0
    # Anchors 0 and 1 overlap (IoU 0.82): same class -> one survives; anchor 2 predicts class 2.
    out = outputs([[0.0, big, 0.0], [0.0, big - 1, 0.0], [0.0, 0.0, big]])
    (det,) = postprocess(out, box_coder=make_box_coder(), image_size=(100, 100))
    assert sorted(det.labels.tolist()) == [1, 2]
    out = outputs([[0.0, big, 0.0], [0.0, 0.0, big], [0.0, 0.0, big]])
    (det,) = postprocess(out, box_coder=make_box_coder(), image_size=(100, 100))
    assert sorted(det.labels.tolist()) == [1, 2, 2]  # different classes are not suppressed
    strict = PostprocessConfig(min_confidence=0.999)
    assert len(postprocess(out, box_coder=make_box_coder(), image_size=(100, 100), config=strict)[0].scores) == 0


def test_low_confidence_tail_and_cap_per_class():
    out = outputs([[0.0, 0.0, 0.0]] * 3)  # every class at 1/3
    loose = PostprocessConfig(min_confidence=0.0)
    (det,) = postprocess(out, box_coder=make_box_coder(), image_size=(100, 100), config=loose)
    assert len(det.scores) == 4  # two classes x (anchor 0 or 1 after NMS, anchor 2)
    assert torch.all(det.scores[:-1] >= det.scores[1:])
    capped = PostprocessConfig(min_confidence=0.0, max_per_class=1)
    (det,) = postprocess(out, box_coder=make_box_coder(), image_size=(100, 100), config=capped)
    assert sorted(det.labels.tolist()) == [1, 2]


def test_boxes_are_clipped_to_the_image():
    out = outputs([[0.0, 8.0, 0.0]] * 3)
    (det,) = postprocess(out, box_coder=make_box_coder(), image_size=(70, 70))
    assert det.boxes.max() <= 70 and det.boxes.min() >= 0
    assert not math.isnan(det.boxes.sum().item())


def test_config_is_validated():
    with pytest.raises(ValueError, match="nms_iou"):
        PostprocessConfig(nms_iou=1.5)
    with pytest.raises(ValueError, match="max_per_class"):
        PostprocessConfig(max_per_class=0)


def test_pre_nms_top_k_keeps_the_best_candidates_of_each_class():
    out = outputs([[0.0, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.2]])
    config = PostprocessConfig(min_confidence=0.0, pre_nms_top_k=1)
    (det,) = postprocess(out, box_coder=make_box_coder(), image_size=(100, 100), config=config)
    # Class 1's best candidate is anchor 1, class 2's is anchor 2: one detection each survives.
    assert sorted(det.labels.tolist()) == [1, 2]
    exact = postprocess(
        out, box_coder=make_box_coder(), image_size=(100, 100), config=PostprocessConfig(min_confidence=0.0)
    )[0]
    assert len(exact.scores) > len(det.scores)
    assert set(det.scores.tolist()) <= set(exact.scores.tolist())


def random_batch(num_images: int, num_classes: int = 6, seed: int = 0) -> MixtureOutputs:
    """Random head outputs over a real model's default boxes (96 px): many overlapping candidates per class,
    different in every image."""
    from almdn_ray.model import build_ssdgmm

    torch.manual_seed(seed)
    model = build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=num_classes, image_size=96).eval()
    with torch.no_grad():
        anchors = model(torch.rand(1, 3, 96, 96)).anchors
    a, k = anchors.shape[0], 2

    def rand(*shape, scale=1.0):
        return torch.randn(num_images, a, k, *shape) * scale

    return MixtureOutputs(
        rand(4, scale=0.5), rand(4), rand(4), rand(num_classes, scale=2.0), rand(num_classes), rand(), anchors
    )


def assert_same_detections(batched, reference):
    assert len(batched) == len(reference)
    for i, (a, b) in enumerate(zip(batched, reference)):
        assert a.labels.tolist() == b.labels.tolist(), f"image {i}"
        for field in a._fields:
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-7, msg=f"{i} {field}")


@pytest.mark.parametrize(
    "config",
    [
        PostprocessConfig(min_confidence=0.5),
        PostprocessConfig(min_confidence=0.3, max_per_class=3),
        PostprocessConfig(min_confidence=0.0, score_threshold=0.2, pre_nms_top_k=10, nms_iou=0.3),
    ],
    ids=["plain", "max-per-class", "pre-nms-top-k"],
)
def test_the_batched_postprocess_equals_the_per_image_reference(config):
    from almdn_ray.model.postprocess import postprocess_reference

    out = random_batch(5)
    kwargs = dict(box_coder=make_box_coder(), image_size=(96, 96), config=config)
    reference = postprocess_reference(out, **kwargs)
    assert all(len(d.scores) >= 2 for d in reference)  # several detections in every image
    assert_same_detections(postprocess(out, **kwargs), reference)


def test_nms_cut_into_calls_at_class_boundaries_keeps_the_detections(monkeypatch):
    module = sys.modules["almdn_ray.model.postprocess"]  # the package exports a function of that name

    out = random_batch(4)
    kwargs = dict(box_coder=make_box_coder(), image_size=(96, 96), config=PostprocessConfig(min_confidence=0.3))
    whole = postprocess(out, **kwargs)
    calls = []
    real_nms = module.nms
    monkeypatch.setattr(module, "nms", lambda *a: calls.append(a[0].shape[0]) or real_nms(*a))
    monkeypatch.setitem(module.NMS_CHUNK, "cpu", 64)
    cut = postprocess(out, **kwargs)
    assert len(calls) > 4 and max(calls) < sum(calls)  # several calls, none with every candidate
    assert_same_detections(cut, whole)
    assert_same_detections(cut, module.postprocess_reference(out, **kwargs))
