import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from almdn_ray.cli import app
from almdn_ray.data import read_coco
from almdn_ray.data.demo import (
    BACKBONE,
    DemoConfig,
    build_demo,
    load_mnist,
    load_photos,
    pretrain_instances,
    render_image,
    split_instances,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def parts():
    digits, labels = load_mnist()
    return digits, labels, load_photos(min_side=96)


def test_boxes_are_tight_around_each_digits_ink(parts):
    digits, labels, photos = parts
    config = DemoConfig(image_size=96, digit_size=(20, 48), small_size=(10, 14), small_fraction=0.3)
    ids = split_instances(labels, config)["pool"]
    for index in range(40):
        rng = np.random.default_rng([0, index])
        image, objects = render_image(rng, photos, digits, ids, labels[ids], config)
        assert image.shape == (96, 96, 3) and 1 <= len(objects) <= 5
        for obj in objects:
            ys, xs = np.nonzero(obj.mask)
            assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert obj.label == labels[obj.instance] + 1
        for a in objects:
            for b in objects:
                if a is not b:
                    assert not np.any(a.mask & b.mask) or (a.box != b.box)


def test_builds_a_thousand_images_deterministically_with_disjoint_digits(tmp_path):
    start = time.perf_counter()
    paths = build_demo(tmp_path / "a", pool_images=1000, test_images=100, config=DemoConfig(seed=3))
    elapsed = time.perf_counter() - start
    pool, test = (json.loads(paths[s].read_text()) for s in ("pool", "test"))
    assert len(pool["images"]) == 1000 and len(test["images"]) == 100
    pool_digits = {a["digit_instance"] for a in pool["annotations"]}
    test_digits = {a["digit_instance"] for a in test["annotations"]}
    assert pool_digits and test_digits and not pool_digits & test_digits
    assert {a["category_id"] for a in pool["annotations"]} == set(range(1, 11))
    print(f"built 1,100 demo images in {elapsed:.1f} s")
    again = build_demo(tmp_path / "b", pool_images=20, test_images=5, config=DemoConfig(seed=3))
    first = json.loads(again["pool"].read_text())
    assert first["annotations"] == [a for a in pool["annotations"] if a["image_id"] <= 20]
    same = np.asarray(Image.open(tmp_path / "a" / "images" / "pool_000007.png"))
    np.testing.assert_array_equal(same, np.asarray(Image.open(tmp_path / "b" / "images" / "pool_000007.png")))


def test_knobs_for_imbalance_and_small_instances(tmp_path):
    config = DemoConfig(seed=1, imbalance=20.0, small_fraction=0.5)
    pool = json.loads(build_demo(tmp_path, pool_images=300, test_images=1, config=config)["pool"].read_text())
    counts = np.bincount([a["category_id"] - 1 for a in pool["annotations"]], minlength=10)
    assert counts[0] > 5 * counts[9]
    small = np.mean([a["small"] for a in pool["annotations"]])
    assert 0.35 < small < 0.65
    assert max(a["bbox"][2] for a in pool["annotations"] if a["small"]) <= config.small_size[1]


def test_cli_writes_a_dataset_the_coco_reader_accepts(tmp_path):
    result = runner.invoke(
        app, ["data", "demo", str(tmp_path), "--images", "12", "--test-images", "4", "--size", "128"]
    )
    assert result.exit_code == 0, result.output
    dataset = read_coco(str(tmp_path / "pool.json"))
    assert len(dataset.records) == 12 and dataset.classes == tuple("0123456789")
    assert dataset.records[0].width == 128
    validated = runner.invoke(app, ["data", "validate", str(tmp_path / "test.json")])
    assert validated.exit_code == 0 and "images: 4" in validated.output
    missing = runner.invoke(app, ["data", "demo", str(tmp_path / "x"), "--mnist", str(tmp_path / "none.csv.gz")])
    assert missing.exit_code == 1 and "none.csv.gz is missing" in missing.output


def _pretrain_script():
    path = Path(__file__).parents[2] / "bench" / "pretrain_backbone.py"
    spec = importlib.util.spec_from_file_location("pretrain_backbone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretraining_pool_and_test_digits_are_disjoint_by_source_index(tmp_path):
    _, labels = load_mnist()
    pretrain = set(pretrain_instances(labels).tolist())
    assert len(pretrain) == 2000 and {int(d) for d in labels[sorted(pretrain)]} == set(range(10))
    for config in (DemoConfig(), DemoConfig(seed=9, test_fraction=0.5)):
        split = split_instances(labels, config)
        assert set(split["pretrain"].tolist()) == pretrain  # fixed: no demo seed moves a digit out of it
        pool, test = set(split["pool"].tolist()), set(split["test"].tolist())
        assert not pool & test and not pool & pretrain and not test & pretrain
        assert len(pool | test | pretrain) == len(labels)
    # What the demo renders, and what the pretraining script renders, by the MNIST index of every digit drawn.
    coco = build_demo(tmp_path, pool_images=150, test_images=50, config=DemoConfig(image_size=96, digit_size=(20, 40)))
    shown = {a["digit_instance"] for s in ("pool", "test") for a in json.loads(coco[s].read_text())["annotations"]}
    assert shown and not shown & pretrain
    script = _pretrain_script()
    _, _, drawn = script.render_set(60, 96, seed=0)
    assert drawn and drawn <= pretrain
    # The committed backbone was pretrained on exactly these digits (its recipe records their digest).
    record = json.loads(BACKBONE.with_suffix(".json").read_text())
    assert record["pretrain_digits"] == {"count": 2000, "sha256": script.digit_digest(np.array(sorted(pretrain)))}


def test_demo_ships_its_backbone_and_the_small_preset_loads_it(tmp_path):
    from almdn_ray.model.detector import build_ssdgmm

    paths = build_demo(tmp_path, pool_images=2, test_images=1, config=DemoConfig(image_size=96, digit_size=(20, 40)))
    assert paths["backbone"].read_bytes() == BACKBONE.read_bytes()
    assert BACKBONE.stat().st_size <= 10 * 2**20
    weights = paths["backbone"]
    model = build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=11, backbone_weights=weights, small_objects=True)
    shipped = torch.load(BACKBONE, weights_only=True)
    first_conv = model.backbone.features[0][0][0].weight  # features.0.0.weight in mobilenet_v3_large's keys
    torch.testing.assert_close(first_conv, shipped["features.0.0.weight"].float())
