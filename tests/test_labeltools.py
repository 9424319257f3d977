"""The human loop with real labelling tools: export for the tool, label there, import what it exports."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from almdn_ray import storage
from almdn_ray.cli import app
from almdn_ray.config import spec_from_dict, spec_to_dict
from almdn_ray.cycle import Driver, RunLayout, labeled_ids
from almdn_ray.data.coco import read_coco, to_coco_dict
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.data.labelfiles import name_candidates, read_label_file
from almdn_ray.data.manifest import dataset_table
from almdn_ray.data.pool import Pool
from almdn_ray.data.records import Dataset, DatasetError, ImageRecord
from almdn_ray.labels import LabelImportError, Prediction, export_labels, import_labels, predict_selection
from almdn_ray.layout import model_spec
from almdn_ray.state import RunState, save_state
from tests import labeltools
from tests.test_cycle import Recorder

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "labeltool-samples"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo data, and a copy of its pool with no labels at all (what a team with a bucket has)."""
    folder = tmp_path_factory.mktemp("demo")
    paths = build_demo(folder, pool_images=30, test_images=4, config=DemoConfig(image_size=64, digit_size=(20, 40)))
    pool = json.loads(Path(paths["pool"]).read_text())
    pool["annotations"] = []
    (folder / "unlabelled.json").write_text(json.dumps(pool))
    return {"pool": folder / "unlabelled.json", "truth": read_coco(str(paths["pool"])), "test": paths["test"]}


def human_job(demo, run):
    data = {
        "storage": {"uri": str(run)},
        "dataset": {"train": str(demo["pool"]), "test": str(demo["test"])},
        "acquisition": {"initial_labeled": 10, "budget": 5, "cycles": 2},
        "labels": {"mode": "human"},
    }
    return spec_from_dict(data)


def _import_truth(run, driver, truth_by_id, tmp_path, name):
    """Label what the run waits for with the true boxes (a COCO file carrying the exported ids)."""
    skeleton = storage.read_json(export_labels(str(run), driver.pool)["labels"])
    ids = [image["almdn_image_id"] for image in skeleton["images"]]
    coco = to_coco_dict(Dataset([truth_by_id[i] for i in ids], driver.pool.classes))
    (tmp_path / name).write_text(json.dumps(coco))
    import_labels(str(run), str(tmp_path / name), driver.pool)
    return ids


def waiting_run(demo, run):
    """A human-mode run on a pool without labels: the cold start's initial set labelled (true boxes), cycle 0
    trained, and the run stopped for the labels of cycle 0's selection; its driver and the selected truth."""
    recorder = Recorder()
    spec = human_job(demo, run)
    state = Driver(spec, recorder.functions()).run()
    assert (state.status, state.cycle, state.stage) == ("awaiting_labels", 0, "train")  # nothing trained yet
    assert recorder.calls == []
    truth = {r.image_id: r for r in demo["truth"].records}
    initial = _import_truth(run, Driver(spec, recorder.functions()), truth, run.parent, "initial.json")
    assert sorted(initial) == labeled_ids(RunLayout(str(run)), 0) and len(initial) == 10
    state = Driver(spec, recorder.functions()).run()
    assert (state.status, state.cycle, state.stage) == ("awaiting_labels", 0, "label")
    trained = recorder.train_records[0]
    assert [r.image_id for r in trained] == sorted(initial)
    assert all(np.array_equal(r.boxes, truth[r.image_id].boxes) for r in trained)  # cycle 0: the imported boxes
    driver = Driver(spec, recorder.functions())
    selected = storage.read_parquet(RunLayout(str(run)).cycle(0, "selected.parquet")).column("image_id").to_pylist()
    return spec, recorder, driver, [truth[i] for i in selected]


def _tool_file(tool, run, driver, truth, tmp_path):
    classes = driver.pool.classes
    if tool == "labelstudio_json":
        paths = export_labels(str(run), driver.pool, fmt="labelstudio")
        tasks = storage.read_json(paths["labels"])
        assert [t["data"]["almdn_image_id"] for t in tasks] == [r.image_id for r in truth]
        assert tasks[0]["data"]["image"].startswith("/data/local-files/?d=")
        return labeltools.labelstudio_json(tasks, truth, classes, tmp_path / "ls")
    if tool == "labelstudio_coco":
        export_labels(str(run), driver.pool, fmt="labelstudio")
        return labeltools.labelstudio_coco(truth, classes, tmp_path / "ls")
    if tool == "cvat_coco":
        paths = export_labels(str(run), driver.pool, fmt="cvat")
        exported = storage.read_json(paths["labels"])
        assert exported["licenses"] and [i["almdn_image_id"] for i in exported["images"]] == [r.image_id for r in truth]
        return labeltools.cvat_coco(truth, classes, tmp_path / "cvat")
    if tool == "cvat_voc":
        export_labels(str(run), driver.pool, fmt="cvat")
        return labeltools.cvat_voc(truth, classes, tmp_path / "cvat")
    assert tool == "roboflow_coco"
    export_labels(str(run), driver.pool, fmt="coco")
    return labeltools.roboflow_coco(truth, classes, tmp_path / "roboflow")


@pytest.mark.parametrize("tool", ["labelstudio_coco", "labelstudio_json", "cvat_coco", "cvat_voc", "roboflow_coco"])
def test_a_tool_export_of_the_true_boxes_is_what_the_next_cycle_trains_on(demo, tmp_path, tool):
    run = tmp_path / "run"
    spec, recorder, driver, truth = waiting_run(demo, run)
    assert sum(len(r.labels) for r in truth) > 0
    path = _tool_file(tool, run, driver, truth, tmp_path)
    summary = import_labels(str(run), str(path), driver.pool)
    assert summary.images == len(truth) and summary.boxes == sum(len(r.labels) for r in truth)
    if tool == "labelstudio_json":  # two tasks had a second annotator, one a cancelled annotation
        assert summary.problems.counts["tasks with several annotations (one taken)"] == 3
    if tool == "roboflow_coco":
        assert summary.problems.counts["unknown categories without boxes ignored"] == 1  # the super-category
        assert summary.problems.counts["boxes rescaled from the tool's image size"] == len(truth)
    assert Driver(spec, recorder.functions()).run().status == "finished"
    trained = {r.image_id: r for r in recorder.train_records[-1]}  # cycle 1
    assert set(trained) == set(labeled_ids(RunLayout(str(run)), 1))
    for record in truth:
        got = trained[record.image_id]
        assert got.labels.tolist() == record.labels.tolist()
        np.testing.assert_allclose(got.boxes, record.boxes, atol=1e-3)
    assert len(trained) == 10 + len(truth)


def test_label_studio_predictions_carry_the_models_detections_and_come_back_as_labels(demo, tmp_path):
    run = tmp_path / "run"
    spec, _, driver, truth = waiting_run(demo, run)
    model_s = model_spec(spec, driver.pool.num_classes)
    torch.manual_seed(0)
    model_uri = RunLayout(str(run)).cycle(0, "train", "model.pt")
    torch.save(model_s.build().state_dict(), model_uri)
    predictions = predict_selection(str(run), driver.pool, model_s, min_score=0.0)
    assert set(predictions) == {r.image_id for r in truth} and all(predictions.values())
    root = str(Path(demo["pool"]).parent / "images")
    paths = export_labels(
        str(run), driver.pool, fmt="labelstudio", predictions=predictions, url_prefix="s3://b/", image_root=root
    )
    tasks = storage.read_json(paths["labels"])
    assert "<RectangleLabels" in storage.read_bytes(paths["config"]).decode()
    for task, record in zip(tasks, truth):
        assert task["data"]["image"] == "s3://b/" + Path(record.uri).name
        (prediction,) = task["predictions"]
        assert len(prediction["result"]) == len(predictions[record.image_id])
        for region, p in zip(prediction["result"], predictions[record.image_id]):
            assert region["score"] == pytest.approx(p.score) and 0 <= region["value"]["x"] <= 100
            assert region["value"]["rectanglelabels"] == [driver.pool.classes[p.label - 1]]
    # A labeller who accepts every pre-annotation: Label Studio exports them as the annotation.
    for n, task in enumerate(tasks):
        task["id"], task["annotations"] = n + 1, [{"id": n + 1, "result": task.pop("predictions")[0]["result"]}]
    (tmp_path / "accepted.json").write_text(json.dumps(tasks))
    summary = import_labels(str(run), str(tmp_path / "accepted.json"), driver.pool)
    stored = storage.read_json(RunLayout(str(run)).cycle(0, "labels.json"))
    for record in truth:
        want = [p for p in predictions[record.image_id] if p.box[2] > p.box[0] and p.box[3] > p.box[1]]
        assert [b["label"] for b in stored[record.image_id]] == [p.label for p in want]
        np.testing.assert_allclose([b["bbox"] for b in stored[record.image_id]], [p.box for p in want], atol=1e-3)
    assert summary.boxes == sum(len(v) for v in stored.values())


def test_cvat_export_has_the_detections_as_pre_annotations(demo, tmp_path):
    run = tmp_path / "run"
    _, _, driver, truth = waiting_run(demo, run)
    guess = {r.image_id: [Prediction((1.0, 2.0, 11.0, 22.0), 3, 0.75)] for r in truth}
    paths = export_labels(
        str(run), driver.pool, fmt="cvat", predictions=guess, image_root=str(Path(demo["pool"]).parent)
    )
    coco = storage.read_json(paths["labels"])
    assert [i["file_name"] for i in coco["images"]] == ["images/" + Path(r.uri).name for r in truth]
    assert len(coco["annotations"]) == len(truth)
    ann = coco["annotations"][0]
    assert ann["bbox"] == [1.0, 2.0, 10.0, 20.0] and ann["score"] == 0.75 and ann["category_id"] == 3
    assert ann["attributes"] == {"occluded": False, "rotation": 0.0}
    rows = storage.read_bytes(paths["csv"]).decode().splitlines()
    assert rows[0] == "image_id,uri,file_name,width,height" and rows[1].split(",")[2] == coco["images"][0]["file_name"]


# ---- import checks on a hand-made selection -------------------------------------------------------------------
def _record(image_id, uri, boxes=(), labels=()):
    return ImageRecord(
        image_id, uri, 100, 80, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
        np.zeros(len(labels), bool),
    )  # fmt: skip


@pytest.fixture
def selection(tmp_path):
    """A run waiting for the labels of 3 selected images (two share a basename in different folders)."""
    pool = pool_of(
        [
            _record("a", "s3://bucket/cam1/frame_001.jpg"),
            _record("b", "s3://bucket/cam2/frame_001.jpg"),
            _record("c", "s3://bucket/cam2/street.png"),
            _record("d", "s3://bucket/cam2/other.png"),
            _record("e", "s3://bucket/cam2/old.png"),
        ],
        ("Car", "person"),
    )
    run = str(tmp_path / "run")
    save_state(run, RunState(run_id="x", cycle=0, stage="label", status="awaiting_labels"))
    storage.write_parquet(RunLayout(run).cycle(0, "selected.parquet"), pa.table({"image_id": ["a", "b", "c"]}))
    storage.write_parquet(RunLayout(run).cycle(0, "labeled.parquet"), pa.table({"image_id": ["e"]}))
    return run, pool


def pool_of(records, classes):
    return Pool(dataset_table(Dataset(records, classes)), tuple(classes), {})


def _coco(tmp_path, images, annotations, categories=({"id": 1, "name": "Car"}, {"id": 2, "name": "person"})):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return str(path)


def _image(n, name, **extra):
    return {"id": n, "file_name": name, "width": 100, "height": 80, **extra}


def test_images_match_by_id_then_path_then_basename_and_boxes_within_a_pixel_are_clipped(selection, tmp_path):
    run, pool = selection
    path = _coco(
        tmp_path,
        [
            _image(1, "x.jpg", almdn_image_id="a"),
            _image(2, "cam2\\frame_001.jpg"),
            _image(3, "images/0a1b2c3d-street.png"),
            _image(4, "old.png", almdn_image_id="e"),  # labelled in an earlier cycle: the project's export has it
        ],
        [
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [-0.6, 10, 50, 20]},
            {"id": 8, "image_id": 2, "category_id": 2, "bbox": [60, 40, 40.5, 40]},
            {"id": 9, "image_id": 3, "category_id": 2, "bbox": [1, 2, 3, 4]},
        ],
        categories=[{"id": 1, "name": " car"}, {"id": 2, "name": "person"}, {"id": 5, "name": "truck"}],
    )
    summary = import_labels(run, path, pool)
    stored = storage.read_json(RunLayout(run).cycle(0, "labels.json"))
    assert stored["a"] == [{"bbox": [0.0, 10.0, 49.4, 30.0], "label": 1}]
    assert stored["b"] == [{"bbox": [60.0, 40.0, 100.0, 80.0], "label": 2}]
    assert stored["c"] == [{"bbox": [1.0, 2.0, 4.0, 6.0], "label": 2}]
    counts = summary.problems.counts
    assert counts["boxes over the image edge by <= 1 px clipped"] == 2
    assert counts["category names matched after normalising case and space"] == 1
    assert counts["unknown categories without boxes ignored"] == 1
    assert counts["images labelled in an earlier cycle ignored"] == 1 and "e" not in stored
    assert storage.read_json(RunLayout(run).cycle(0, "labels-import.json"))["format"] == "coco"


def test_every_bad_box_category_and_image_is_named_and_nothing_is_written(selection, tmp_path):
    run, pool = selection
    path = _coco(
        tmp_path,
        [
            _image(1, "frame_001.jpg"),
            _image(2, "street.png"),
            _image(3, "nowhere.png"),
            _image(4, "other.png"),
            _image(5, "b.png", almdn_image_id="d"),
        ],
        [
            {"id": 1, "image_id": 2, "category_id": 1, "bbox": [float("nan"), 1, 2, 3]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 0, 3]},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [90, 5, 20, 3]},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [1, 1, 2, 2]},
            {"id": 5, "image_id": 2, "category_id": 1, "bbox": [1, 1, 2]},
            {"id": 6, "image_id": 2, "category_id": 1, "bbox": [1, "one", 2, 2]},
        ],
        categories=[{"id": 1, "name": "Car"}, {"id": 3, "name": "bus"}],
    )
    with pytest.raises(LabelImportError) as caught:
        import_labels(run, path, pool)
    message = str(caught.value)
    for expected in (
        "image 1 ('frame_001.jpg') is ambiguous: 'frame_001.jpg' names several selected images ['a', 'b']",
        "(image c) annotation 1: coordinates [nan, 1.0, nan, 4.0] are not finite numbers",
        "(image c) annotation 2: box [5.0, 5.0, 5.0, 8.0] is empty",
        "(image c) annotation 3: box [90.0, 5.0, 110.0, 8.0] lies 10.0 px outside the 100x80 image",
        "(image c) annotation 4: category 'bus' is not a class of the run",
        "(image c) annotation 5: bbox [1, 1, 2] must be [x, y, width, height]",
        "(image c) annotation 6: coordinates [1, 'one', 2, 2] are not four numbers",
        "image 3 ('nowhere.png') matches no selected image",
        "image 4 ('other.png') matches no selected image",
        "image 5 ('b.png') has almdn_image_id 'd', which was not selected in this cycle",
        "2 selected image(s) are missing from the file: a, b",
    ):
        assert expected in message, expected
    assert not storage.exists(RunLayout(run).cycle(0, "labels.json"))
    assert not storage.exists(RunLayout(run).cycle(0, "labels-import.json"))


def test_label_studio_policy_and_rotated_rectangles(selection, tmp_path):
    run, pool = selection

    def region(x, y, w, h, rotation=0, label="person"):
        value = {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}
        return {"type": "rectanglelabels", "original_width": 100, "original_height": 80, "value": value}

    def ann(aid, result, updated, **flags):
        return {"id": aid, "result": result, "updated_at": updated, **flags}

    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=cam1/frame_001.jpg"},
         "annotations": [ann(1, [region(10, 10, 10, 10)], "2024-01-02", ground_truth=True),
                         ann(2, [region(50, 50, 5, 5)], "2024-03-01")]},
        {"id": 2, "data": {"image": "s3://bucket/cam2/frame_001.jpg"},
         "annotations": [ann(3, [region(0, 0, 10, 10)], "2024-01-01"),
                         ann(4, [region(20, 20, 10, 10)], "2024-02-01"),
                         ann(5, [], "2024-04-01", was_cancelled=True)]},
        {"id": 3, "data": {"image": "/data/upload/3/deadbeef-street"},
         "annotations": [ann(6, [region(20, 25, 10, 20, rotation=90), {"type": "choices"}], "2024-01-01")]},
    ]  # fmt: skip
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(tasks))
    summary = import_labels(run, str(path), pool)
    stored = storage.read_json(RunLayout(run).cycle(0, "labels.json"))
    np.testing.assert_allclose(stored["a"][0]["bbox"], [10, 8, 20, 16])  # ground truth wins over the later one
    np.testing.assert_allclose(stored["b"][0]["bbox"], [20, 16, 30, 24])  # the latest not cancelled
    # 90 degrees clockwise about the top-left corner (20, 20): a 10 x 16 px box becomes 16 wide, 10 tall, to the left.
    np.testing.assert_allclose(stored["c"][0]["bbox"], [4, 20, 20, 30])
    assert summary.problems.counts["rotated rectangles taken as their enclosing box"] == 1
    assert summary.problems.counts["regions that are not rectangles ignored"] == 1
    assert summary.problems.counts["tasks with several annotations (one taken)"] == 2


def test_a_task_without_annotations_is_an_error_naming_it(selection, tmp_path):
    run, pool = selection
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"id": 4, "data": {"image": "street.png"}, "annotations": []}]))
    with pytest.raises(LabelImportError, match=r"task 4 \('street.png'\) has no annotation that was not cancelled"):
        import_labels(run, str(path), pool)


def test_tool_renaming_is_undone():
    assert name_candidates("images\\/36c114a4-D-45703-010_1.png".replace("\\/", "/")) == [
        "images/36c114a4-D-45703-010_1.png",
        "images/D-45703-010_1.png",
    ]
    assert name_candidates("cow_png.rf.0123456789abcdef0123456789abcdef.jpg")[-1] == "cow.png"
    assert name_candidates("/data/local-files/?d=pets%2Fcat%201.jpg") == ["pets/cat 1.jpg"]
    assert name_candidates("http://ls:8080/data/upload/12/abcdef01-dog.jpg") == ["abcdef01-dog.jpg", "dog.jpg"]
    assert name_candidates("C:\\data\\cats\\a.png") == ["C:/data/cats/a.png"]


# ---- readers ----------------------------------------------------------------------------------------------------
def test_voc_follows_filename_labelmap_and_the_only_split(tmp_path):
    records = [_record("img_a", str(tmp_path / "x" / "img_a.png"), [[10.5, 5, 30, 40]], [2])]
    classes = ("Кесадилья с курицей", "Поднос")
    folder = labeltools.cvat_voc(records, classes, tmp_path / "voc", as_zip=False)
    (folder / "JPEGImages").mkdir()
    (folder / "JPEGImages" / "img_a.png").write_bytes(b"")
    extra = (folder / "Annotations" / "img_a.xml").read_text().replace("img_a.png", "img_b.tif").replace("img_a", "x")
    (folder / "Annotations" / "img_b.xml").write_text(extra)
    (folder / "JPEGImages" / "img_b.png").write_bytes(b"")  # the XML names a .tif; the image is a .png
    (folder / "ImageSets" / "Main" / "default.txt").write_text("img_a\nimg_b\n")
    dataset = read_coco_or_voc(str(folder))
    assert dataset.classes == classes  # from labelmap.txt, without "background"
    assert [r.uri.rsplit("/", 1)[-1] for r in dataset.records] == ["img_a.png", "img_b.png"]
    assert dataset.records[0].boxes.tolist() == [[10.5, 5.0, 30.0, 40.0]]  # CVAT: continuous, not 1-based
    assert dataset.records[0].labels.tolist() == [2]


def read_coco_or_voc(path):
    from almdn_ray.data.validate import read_dataset

    return read_dataset(path)


def test_classic_voc_stays_one_based_and_several_splits_need_naming(tmp_path):
    folder = tmp_path / "VOC2007"
    (folder / "Annotations").mkdir(parents=True)
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    xml = "<annotation><size><width>50</width><height>40</height></size><object><name>dog</name>"
    xml += "<bndbox><xmin>11</xmin><ymin>6</ymin><xmax>30</xmax><ymax>20</ymax></bndbox></object></annotation>"
    (folder / "Annotations" / "1.xml").write_text(xml)
    for split in ("train", "val"):
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("1\n")
    with pytest.raises(DatasetError, match=r"no trainval.txt and 2 other split files .*give the split"):
        read_coco_or_voc(str(folder))
    from almdn_ray.data.voc import read_voc

    dataset = read_voc(str(folder), split="train")
    assert dataset.records[0].boxes.tolist() == [[10.0, 5.0, 30.0, 20.0]]
    assert dataset.records[0].uri.endswith("JPEGImages/1.jpg")


def test_coco_backslash_names_roboflow_superclass_and_unused_classes(tmp_path):
    records = [_record("a", str(tmp_path / "a.png"), [[1, 2, 30, 40]], [1])]
    path = labeltools.roboflow_coco(records, ("bull", "pig"), tmp_path / "rf")
    dataset = read_coco(str(path))
    assert dataset.classes == ("bull", "pig") and dataset.category_ids == (1, 2)
    assert dataset.problems.counts == {"super-categories dropped": 1, "classes without boxes": 1}
    coco = json.loads(path.read_text())
    coco["images"][0]["file_name"] = "sub\\dir\\a.png"
    path.write_text(json.dumps(coco))
    assert read_coco(str(path), image_root="s3://b/root").records[0].uri == "s3://b/root/sub/dir/a.png"


def test_a_test_split_numbering_classes_differently_is_matched_by_name(tmp_path):
    def write(name, categories, category_id):
        annotation = {"id": 1, "image_id": 1, "category_id": category_id, "bbox": [1, 1, 5, 5]}
        coco = {"images": [_image(1, "a.png")], "categories": categories, "annotations": [annotation]}
        (tmp_path / name).write_text(json.dumps(coco))
        return str(tmp_path / name)

    pool = write("pool.json", [{"id": 0, "name": "Blasen"}, {"id": 1, "name": "Kocher"}], 0)
    test = write("test.json", [{"id": 0, "name": "kocher"}, {"id": 1, "name": "Blasen"}], 0)  # FiftyOne: ids differ
    job = spec_from_dict({"storage": {"uri": str(tmp_path / "run")}, "dataset": {"train": pool, "test": test}})
    driver = Driver(job, Recorder().functions())
    assert driver.test.classes == ("Blasen", "Kocher")
    assert driver.test.records[0].labels.tolist() == [2]  # 'kocher' is the pool's label 2, not its label 1
    other = write("other.json", [{"id": 0, "name": "blistering"}, {"id": 1, "name": "Blasen"}], 0)
    job = spec_from_dict({**spec_to_dict(job), "dataset": {"train": pool, "test": other}})
    with pytest.raises(DatasetError, match=r"class 'blistering' is not one of the pool's classes"):
        _ = Driver(job, Recorder().functions()).test


def test_a_voc_zip_reads_as_the_folder_does(tmp_path):
    records = [_record("img_a", "img_a.jpg", [[1, 2, 30, 40]], [1])]
    path = labeltools.cvat_voc(records, ("car",), tmp_path / "zip")
    assert zipfile.is_zipfile(path)
    labels = read_label_file(str(path))
    assert labels.format == "voc" and labels.categories == ["car"]
    assert labels.images[0].names == ["img_a.jpg", "img_a"] and labels.images[0].boxes[0].xyxy == (1, 2, 30, 40)


@pytest.mark.skipif(not SAMPLES.exists(), reason="../shared/labeltool-samples is not here")
@pytest.mark.parametrize(
    "sample",
    [
        "labelstudio-coco/result.json",
        "labelstudio-json/two-annotators-per-task.json",
        "cvat-coco/annotations/instances_default.json",
        "cvat-voc",
        "roboflow-coco/test/_annotations.coco.json",
        "fiftyone-coco/training/labels.json",
        "fiftyone-coco/test/labels.json",
    ],
)
def test_every_real_tool_export_reads(sample):
    result = CliRunner().invoke(app, ["data", "validate", "--no-check-images", str(SAMPLES / sample)])
    assert result.exit_code == 0, result.output
    assert "usable: yes" in result.output and result.exception is None


def test_the_cli_exports_for_label_studio_with_predictions_and_imports_its_export(demo, tmp_path):
    run = tmp_path / "run"
    spec, recorder, driver, truth = waiting_run(demo, run)
    torch.manual_seed(0)
    model = model_spec(spec, driver.pool.num_classes).build()
    torch.save(model.state_dict(), RunLayout(str(run)).cycle(0, "train", "model.pt"))
    cli = CliRunner()
    result = cli.invoke(app, ["labels", "export", str(run), "--format", "labelstudio", "--min-score", "0.05"])
    assert result.exit_code == 0, result.output
    assert "Label Studio labelling config:" in result.output and "pre-annotations:" in result.output
    assert f"file names are relative to {Path(demo['pool']).parent}" in result.output
    tasks = storage.read_json(RunLayout(str(run)).cycle(0, "export", "to_label.labelstudio.json"))
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=images/" + Path(truth[0].uri).name
    assert all(r["score"] >= 0.05 for t in tasks for r in t["predictions"][0]["result"])
    path = labeltools.labelstudio_json(tasks, truth, driver.pool.classes, tmp_path / "ls")
    result = cli.invoke(app, ["labels", "import", str(run), str(path)])
    assert result.exit_code == 0, result.output
    boxes = sum(len(r.labels) for r in truth)
    assert f"imported {boxes} boxes on {len(truth)} images (labelstudio)" in result.output
    assert "warning: 3 tasks with several annotations (one taken)" in result.output
    result = cli.invoke(app, ["labels", "import", str(run), str(path)])  # again before `run`: replaces them
    assert result.exit_code == 0
    assert cli.invoke(app, ["labels", "export", str(run), "--format", "yolo"]).exit_code == 1


@pytest.mark.skipif(not SAMPLES.exists(), reason="../shared/labeltool-samples is not here")
def test_validate_finds_a_label_studio_exports_images_by_basename_windows_paths_too(tmp_path):
    from tests.conftest import encode_image, random_image

    coco = json.loads((SAMPLES / "labelstudio-coco" / "result.json").read_text())
    for n, image in enumerate(coco["images"]):
        base = name_candidates(image["file_name"])[-1].rsplit("/", 1)[-1]  # the upload hash undone
        (tmp_path / base).write_bytes(encode_image(random_image(image["width"], image["height"])))
        if n % 2:
            image["file_name"] = image["file_name"].replace("/", "\\")  # exported on Windows
    (tmp_path / "result.json").write_text(json.dumps(coco))
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "result.json")])
    assert result.exit_code == 1, result.output  # found, but `run` reads the names as written: fix them first
    assert "problem: 11 images found by another name" in result.output and "  … and 6 more" in result.output
    assert "images/36c114a4-D-45703-010_1.png: found as D-45703-010_1.png" in result.output
    assert "missing" not in result.output.replace(str(tmp_path), "")
