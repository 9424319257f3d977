import logging

import numpy as np
import pyarrow as pa
import pytest
import torch

from almdn_ray.data import read_coco
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.data.transforms import DetectionDataset, eval_transform
from almdn_ray.evaluation import coco_metrics, evaluate, voc_average_precision, voc_mean_ap
from almdn_ray.model import ModelSpec
from almdn_ray.training import LocalContext, TrainRecipe, train_worker

log = logging.getLogger(__name__)


def gt(boxes, labels, difficult=None):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return {"boxes": boxes, "labels": np.asarray(labels), "difficult": np.asarray(difficult or [False] * len(labels))}


def det(boxes, scores, labels):
    return {
        "boxes": np.asarray(boxes, np.float64).reshape(-1, 4),
        "scores": np.asarray(scores),
        "labels": np.asarray(labels),
    }


def test_a_perfect_detector_scores_one():
    truths = [gt([[0, 0, 10, 10], [20, 20, 40, 50]], [1, 2]), gt([[5, 5, 15, 25]], [2])]
    detections = [det(t["boxes"], [0.9] * len(t["labels"]), t["labels"]) for t in truths]
    for use_07 in (True, False):
        result = voc_mean_ap(detections, truths, use_07_metric=use_07)
        assert result["map"] == 1.0 and result["ap"] == {1: 1.0, 2: 1.0}
    metrics = coco_metrics(detections, truths)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


def test_hand_worked_case_with_difficult_duplicate_and_wrong_class():
    truths = [
        gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1], difficult=[False, True]),  # image A
        gt([[0, 0, 10, 10], [40, 40, 50, 50]], [1, 2]),  # image B
    ]
    detections = [
        det([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [1, 1, 1]),  # TP, duplicate, difficult
        det([[0, 0, 10, 10], [0, 0, 10, 10]], [0.6, 0.5], [2, 1]),  # wrong class (FP for class 2), TP
    ]
    # Class 1 in score order: TP, FP, (difficult: neither), TP -> recall .5 .5 1, precision 1 .5 .667.
    # VOC07: six points (recall 0 .. .5) at precision 1, five points (.6 .. 1) at 2/3.
    voc07 = voc_mean_ap(detections, truths, use_07_metric=True)
    assert voc07["ap"][1] == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)
    assert voc07["ap"][2] == 0.0  # its only detection is on a class-1 object
    assert voc07["map"] == pytest.approx((6 + 10 / 3) / 11 / 2)
    # Area under the envelope: 0.5 * 1 + 0.5 * 2/3.
    area = voc_mean_ap(detections, truths, use_07_metric=False)
    assert area["ap"][1] == pytest.approx(0.5 + 1 / 3)
    assert area["map"] == pytest.approx((0.5 + 1 / 3) / 2)


def test_iou_threshold_is_strict_and_continuous():
    truths = [gt([[0, 0, 10, 10]], [1])]
    half = [det([[0, 0, 10, 5]], [0.9], [1])]  # IoU exactly 0.5 (no +1 in the areas)
    assert voc_mean_ap(half, truths)["map"] == 0.0
    assert voc_mean_ap(half, truths, iou_threshold=0.49)["map"] == 1.0


def test_only_difficult_classes_are_not_averaged():
    truths = [gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], difficult=[False, True])]
    result = voc_mean_ap([det([[0, 0, 10, 10]], [0.9], [1])], truths)
    assert result["ap"] == {1: 1.0} and result["map"] == 1.0


def test_area_ap_of_a_simple_curve():
    assert voc_average_precision(np.array([0.5, 1.0]), np.array([1.0, 0.5]), use_07_metric=False) == 0.75


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    config = DemoConfig(image_size=128, digit_size=(32, 64), small_fraction=0.0, seed=5)
    paths = build_demo(tmp_path_factory.mktemp("demo"), pool_images=128, test_images=48, config=config)
    return read_coco(str(paths["pool"])), read_coco(str(paths["test"]))


def test_training_on_demo_data_lifts_voc_map_well_above_the_untrained_model(demo):
    pool, test = demo
    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=pool.num_classes, image_size=128)
    torch.manual_seed(0)
    before = evaluate(spec.build(), test)
    recipe = TrainRecipe(
        max_iterations=300, batch_size=8, optimizer="adam", lr=6e-3, warmup_iterations=45, warmup_power=1.0,
        lr_steps=(200, 260), lr_gamma=0.2, checkpoint_every=100, augment=False, precise_bn_batches=10,
    )  # fmt: skip
    dataset = DetectionDataset(pool.records, eval_transform(128))
    model = train_worker(spec=spec, dataset=dataset, recipe=recipe, context=LocalContext()).eval()
    after = evaluate(model, test)
    log.info(
        "demo VOC07 mAP: untrained %.4f, trained %.4f; COCO %s", before["map_voc07"], after["map_voc07"], after["coco"]
    )
    assert after["map_voc07"] >= 0.05 and after["map_voc07"] >= 10 * before["map_voc07"]
    assert after["map_area"] > before["map_area"]
    # COCO metrics through pycocotools on the same detections.
    assert set(after["coco"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert after["coco"]["AP50"] > before["coco"]["AP50"] and after["coco"]["AP50"] >= after["coco"]["AP"]
    assert set(after["ap_voc07"]) <= set(test.classes) and after["num_images"] == 48
    check_bf16_selects_what_float32_selects(model.eval(), pool)


def check_bf16_selects_what_float32_selects(model, pool, budget=20):
    """The demo model scored under bf16 autocast (as on CUDA) and in float32: the same AL-MDN selection.

    Tolerance (documented in README): at most a tenth of the budget may swap, and only across the cut-off: each
    image bf16 drops or adds lies within two fifths of the budget of the cut-off in the float32 ranking (ties at
    bf16's ~3 significant digits reorder near neighbours; they never bring in an image from far down the ranking).
    """
    from almdn_ray.data.manifest import rows_from_dataset
    from almdn_ray.reduce import select_from_scores
    from almdn_ray.scoring import score_table

    manifest = pa.table(dict(zip(["image_id", "uri", "width", "height"], zip(*rows_from_dataset(pool)))))
    fp32 = score_table(model, manifest, batch_size=16)
    bf16 = score_table(model, manifest, batch_size=16, bf16=True)
    assert fp32.column("n_det").to_pylist() != [0] * fp32.num_rows  # the model detects: the check has teeth
    rank = {image: r for r, image in enumerate(select_from_scores(fp32, fp32.num_rows).image_ids.tolist())}
    a = set(select_from_scores(fp32, budget).image_ids.tolist())
    b = set(select_from_scores(bf16, budget).image_ids.tolist())
    slack = max(1, 2 * budget // 5)
    log.info(
        "bf16 vs float32 selection of %d: %d in common; float32 ranks of the swapped images %s",
        budget, len(a & b), sorted(rank[i] for i in a ^ b),
    )  # fmt: skip
    assert len(a & b) >= 0.9 * budget
    assert all(budget - slack <= rank[i] < budget + slack for i in a ^ b), sorted((rank[i], i) for i in a ^ b)
