import logging
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from almdn_ray import acquisition, engine, scoring
from almdn_ray.model import ModelSpec, PostprocessConfig
from almdn_ray.training import LocalContext, TrainRecipe, train_worker

SIZE = 160
COLOURS = {1: (1.0, 0.2, 0.2), 2: (0.2, 0.4, 1.0)}
log = logging.getLogger(__name__)


def make_images(num_images: int, seed: int):
    """Noise backgrounds with one or two objects: class 1 = red square, class 2 = tall blue bar."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(num_images):
        image = torch.rand(3, SIZE, SIZE, generator=g) * 0.4
        boxes, labels = [], []
        for j in range(1 + i % 2):
            label = 1 + (i + j) % 2
            w, h = (48, 48) if label == 1 else (30, 64)
            x0 = 8 + j * 80 + int(torch.randint(0, 16, (1,), generator=g))
            y0 = 8 + int(torch.randint(0, SIZE - h - 16, (1,), generator=g))
            image[:, y0 : y0 + h, x0 : x0 + w] = torch.tensor(COLOURS[label])[:, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return torch.stack(images), targets


class Pairs(Dataset):
    def __init__(self, images, targets):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


@pytest.fixture(scope="module")
def trained():
    images, targets = make_images(4, seed=1)
    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, num_components=4, image_size=SIZE)
    recipe = TrainRecipe(
        max_iterations=200, batch_size=4, optimizer="adam", lr=1e-3, warmup_iterations=0, lr_steps=(),
        checkpoint_every=5, augment=False, precise_bn_batches=1, seed=1,
    )  # fmt: skip
    context = LocalContext()
    start = time.perf_counter()
    model = train_worker(spec=spec, dataset=Pairs(images, targets), recipe=recipe, context=context)
    log.info("trained 200 iterations in %.1f s", time.perf_counter() - start)
    return model.eval(), images, targets, context.reports


def test_training_drives_the_loss_down_five_fold(trained):
    reports = trained[3]
    assert [r["iteration"] for r in reports] == list(range(5, 201, 5))
    first, last = reports[-1]["initial_loss"], reports[-1]["loss"]  # iteration 1; mean of the last 5
    assert last <= first / 5, (first, last)
    assert reports[-1]["cls"] < reports[0]["cls"] / 5


def test_trained_model_detects_its_objects(trained):
    model, images, targets, _ = trained
    detections = engine.predict(model, images)
    for i, (det, target) in enumerate(zip(detections, targets)):
        assert len(det.scores) > 0, f"image {i}: nothing detected"
        iou = box_iou(target["boxes"], det.boxes)  # [G, D]
        same_class = target["labels"][:, None] == det.labels[None, :]
        best = (iou * same_class).max(dim=1).values
        log.info("image %d: best IoU per object %s", i, best.tolist())
        assert torch.all(best >= 0.5), (i, best, det.labels, target["labels"])


def test_a_batch_of_four_equals_four_batches_of_one(trained):
    model, images = trained[0], trained[1]
    loose = PostprocessConfig(min_confidence=0.0, score_threshold=0.001)  # the low tail too: many to compare
    together = engine.predict(model, images, batch_size=4, config=loose)
    alone = engine.predict(model, images, batch_size=1, config=loose)
    assert sum(len(d.scores) for d in together) > 20
    for a, b in zip(together, alone):
        assert a.labels.tolist() == b.labels.tolist()
        for field in a._fields:
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-4, atol=1e-4)


def test_predictions_feed_the_acquisition_summaries(trained):
    model, images = trained[0], trained[1]
    detections = engine.predict(model, images, config=PostprocessConfig(min_confidence=0.02))
    image_index, values, entropy = acquisition.detection_values(detections)
    assert values.shape == (sum(len(d.scores) for d in detections), 4)
    summaries = acquisition.summarize(image_index, values, len(detections), entropy)
    assert summaries["n_det"].tolist() == [len(d.scores) for d in detections]
    np.testing.assert_allclose(summaries["cls_ep_max"][0], detections[0].cls_ep.max().item(), rtol=1e-6)


@pytest.mark.parametrize("min_confidence", [0.5, 0.0])
def test_batched_scoring_of_a_trained_model_equals_the_per_image_reference(trained, min_confidence):
    """A model with realistic detections (its few objects, and the low tail at confidence 0): the scoring
    summaries and the detections equal the per-image loop's."""
    from tests.test_scoring import reference_rows

    model, images = trained[0], trained[1]
    pixels = (images * 255).round().to(torch.uint8).numpy()
    config = PostprocessConfig(min_confidence=min_confidence)
    rows = scoring.score_images(model, ["a", "b", "c", "d"], decoded=(pixels, [None] * 4), config=config)
    expected = reference_rows(model, pixels, [None] * 4, config)
    assert rows["n_det"].tolist() == expected["n_det"].tolist() and rows["n_det"].min() >= 1
    assert rows["top_class"].tolist() == expected["top_class"].tolist()
    for name in acquisition.summary_columns():
        np.testing.assert_allclose(rows[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_recalibrate_batch_norm_uses_exact_statistics():
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=0.01))
    batches = [torch.randn(4, 3, 5, 5) * 3 + 2 for _ in range(3)]
    assert engine.recalibrate_batch_norm(model, batches, num_batches=2) == 2
    torch.testing.assert_close(model[0].running_mean, torch.cat(batches[:2]).mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert model[0].momentum == 0.01 and model.training
