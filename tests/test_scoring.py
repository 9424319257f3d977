"""The scoring map's batch work: equal to the per-image reference, and a fixed number of host syncs per batch."""

from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from almdn_ray import acquisition, engine, scoring
from almdn_ray.model import PostprocessConfig, build_ssdgmm
from almdn_ray.model.anchors import make_box_coder
from almdn_ray.model.postprocess import postprocess_reference

SYNCS = ("aten::nonzero", "aten::item", "aten::_local_scalar_dense", "torchvision::nms")
CONFIG = PostprocessConfig(min_confidence=0.7)  # three detections per image from this random model


@pytest.fixture(scope="module")
def model():
    """A random model whose class biases vary by anchor: an untrained backbone's features are nearly zero, so
    the biases decide which anchors detect (the same in every image)."""
    torch.manual_seed(3)
    model = build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, image_size=64).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("head.cls_head") and name.endswith(".1.bias"):
                parameter.normal_(0.0, 1.0)
    return model


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, 64, 64), dtype=np.uint8)


@torch.no_grad()
def reference_rows(model, images: np.ndarray, errors, config):
    """Today's per-image path: detections image by image, then acquisition.summarize on the host."""
    readable = np.asarray([i for i, e in enumerate(errors) if e is None])
    batch = torch.from_numpy(images[readable]).float().div(255.0)
    outputs = engine.forward(model, batch)
    size = tuple(batch.shape[-2:])
    found = postprocess_reference(outputs, box_coder=make_box_coder(), image_size=size, config=config)
    index, values, entropy = acquisition.detection_values(found)
    rows = acquisition.summarize(readable[index], values, len(errors), entropy)
    rows["top_class"] = np.full(len(errors), -1)
    for position, det in zip(readable, found):
        if len(det.labels):
            rows["top_class"][position] = int(det.labels[0])
    return rows


@pytest.mark.parametrize("min_confidence", [0.5, 0.0])  # 40 per image; thousands of candidates
def test_score_images_equals_the_per_image_reference(model, min_confidence):
    config = PostprocessConfig(min_confidence=min_confidence)
    images = pixels(6)
    errors = [None, None, "unreadable: test", None, None, None]
    rows = scoring.score_images(model, [f"i{k}" for k in range(6)], decoded=(images, errors), config=config)
    expected = reference_rows(model, images, errors, config)
    assert rows["n_det"].tolist() == expected["n_det"].tolist() and rows["n_det"][2] == 0
    assert rows["n_det"].sum() >= 6
    assert rows["top_class"].tolist() == expected["top_class"].tolist()
    for name in acquisition.summary_columns():
        np.testing.assert_allclose(rows[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)  # float32 values
    assert rows["error"][2] == "unreadable: test" and rows["loc_al_max"][2] == -np.inf


@torch.no_grad()
def host_syncs(fn) -> Counter:
    """What in one call would stop a GPU's stream: size-dependent ops and scalar reads, and NMS calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found = Counter(event.name for event in prof.events())
    return Counter({name: found[name] for name in SYNCS})


def test_host_syncs_and_nms_calls_per_scoring_batch_do_not_grow_with_the_batch(model):
    ids = [f"i{k}" for k in range(64)]
    images = pixels(64, seed=1)
    counts = {}
    for size in (4, 64):
        score = partial(scoring.score_images, model, ids[:size], decoded=(images[:size], [None] * size), config=CONFIG)
        score()  # warm-up
        counts[size] = host_syncs(score)
    found = scoring.score_images(model, ids, decoded=(images, [None] * 64), config=CONFIG)
    assert found["n_det"].min() >= 1 and found["n_det"].sum() < 1000  # a few detections per image
    assert counts[4] == counts[64], counts
    assert sum(counts[64].values()) <= 6, counts[64]
    # The per-image reference pays per image: the measurement sees the difference.
    outputs = engine.forward(model, torch.from_numpy(images).float().div(255.0))
    kwargs = dict(box_coder=make_box_coder(), image_size=(64, 64), config=CONFIG)
    per_image = host_syncs(lambda: postprocess_reference(outputs, **kwargs))
    assert per_image["torchvision::nms"] == 64 and sum(per_image.values()) > 10 * sum(counts[64].values())
