import math

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
