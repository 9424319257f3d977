"""Label Studio as the labelling path, against a real server: `labels push`, a person's annotations made through
its API, `labels pull`, `run`; and what pull refuses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from almdn_ray import storage
from almdn_ray.cli import app
from almdn_ray.cycle import Driver, RunLayout, labeled_ids
from almdn_ray.data.coco import read_coco
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.labelstudio import LabelStudioError, public_url, push_record_uri, read_token
from almdn_ray.state import load_state
from tests import labelstudio_server
from tests.test_labeltools import waiting_run

runner = CliRunner()


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory):
    """The server for the session; its document root holds this module's demo data."""
    if not labelstudio_server.installed():
        pytest.fail(
            "Label Studio is not installed for the tests: run `make test-tools` (tests/tools/install_labelstudio.sh)"
        )
    server = labelstudio_server.start(tmp_path_factory.mktemp("labelstudio-data"), tmp_path_factory.mktemp("ls-root"))
    yield server
    labelstudio_server.stop(server)


@pytest.fixture(scope="module")
def demo(labelstudio):
    """Demo data under the server's document root, and its pool with no labels (a team's bucket)."""
    folder = labelstudio.root / "demo"
    config = DemoConfig(image_size=96, digit_size=(24, 48), small_fraction=0.0)
    paths = build_demo(folder, pool_images=16, test_images=4, config=config)
    pool = json.loads(Path(paths["pool"]).read_text())
    pool["annotations"] = []
    (folder / "unlabelled.json").write_text(json.dumps(pool))
    return {"pool": folder / "unlabelled.json", "truth": read_coco(str(paths["pool"])), "test": paths["test"]}


def region(record, box, label: str) -> dict:
    """A rectangle as Label Studio's image tool stores it: percent of the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = record.width, record.height
    value = {"x": 100 * x1 / w, "y": 100 * y1 / h, "width": 100 * (x2 - x1) / w, "height": 100 * (y2 - y1) / h}
    return {
        "type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": w,
        "original_height": h, "image_rotation": 0, "value": {**value, "rotation": 0, "rectanglelabels": [label]},
    }  # fmt: skip


def annotate(server, record_uri: str, truth, classes, *, wrong: dict | None = None) -> dict[int, int]:
    """A person labels each pushed task: opens its image (served by Label Studio) and draws the true boxes;
    ``wrong``: ``{image_id: label}`` draws that label instead on that image. Returns ``task -> annotation``."""
    client, made = server.client(), {}
    for pushed in storage.read_json(record_uri)["tasks"]:
        task = client.tasks.get(pushed["task"])
        record = truth[task.data["almdn_image_id"]]
        image = httpx.get(server.url + task.data["image"], headers={"Authorization": f"Token {server.token}"})
        assert image.status_code == 200, (task.data["image"], image.status_code)
        assert Image.open(io.BytesIO(image.content)).size == (record.width, record.height)
        result = [
            region(record, box, (wrong or {}).get(record.image_id, classes[label - 1]))
            for box, label in zip(record.boxes, record.labels)
        ]
        made[task.id] = client.annotations.create(task.id, result=result, was_cancelled=False).id
    return made


def assert_stored_truth(labels_uri: str, truth, ids) -> None:
    stored = storage.read_json(labels_uri)
    assert sorted(stored) == sorted(ids)
    for image_id in ids:
        assert [b["label"] for b in stored[image_id]] == truth[image_id].labels.tolist()
        np.testing.assert_allclose([b["bbox"] for b in stored[image_id]], truth[image_id].boxes, atol=1e-3)


def job_file(path: Path, demo, run: Path) -> Path:
    spec = {
        "name": "labelstudio",
        "storage": {"uri": str(run)},
        "dataset": {"train": str(demo["pool"]), "test": str(demo["test"])},
        "model": {"preset": "ssdlite320_mobilenet_v3", "image_size": 96},
        "train": {
            "max_iterations": 2, "batch_size": 4, "optimizer": "adam", "lr": 0.003, "warmup_iterations": 1,
            "lr_steps": [], "checkpoint_every": 2, "flip": False, "precise_bn_batches": 1,
        },
        "acquisition": {"initial_labeled": 4, "budget": 3, "cycles": 2, "min_confidence": 0.05},
        "resources": {"num_workers": 1, "scoring_batch_size": 4, "eval_batch_size": 8},
        "labels": {"mode": "human"},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(spec))
    return path


def invoke(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def test_two_cycles_with_label_studio_as_the_only_labelling_path(ray_session, labelstudio, demo, tmp_path, monkeypatch):
    run, layout = tmp_path / "run", RunLayout(str(tmp_path / "run"))
    job = job_file(tmp_path / "job.yaml", demo, run)
    truth = {r.image_id: r for r in demo["truth"].records}
    classes = demo["truth"].classes
    token = labelstudio.client().tokens.create().token  # a personal access token, as users make them
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    push = ["labels", "push", str(run), "--labelstudio", labelstudio.url, "--project", "digits"]
    push += ["--document-root", str(labelstudio.root)]

    assert "waiting for labels" in invoke("run", str(job))  # a pool without labels: the initial set first
    out = invoke(*push)
    assert "no model yet" in out and "pushed 4 tasks" in out and "4 new" in out
    initial = push_record_uri(layout.initial_labels)
    annotate(labelstudio, initial, truth, classes)
    assert "imported" in invoke("labels", "pull", str(run))
    assert_stored_truth(layout.initial_labels, truth, [t["image_id"] for t in storage.read_json(initial)["tasks"]])

    invoke("run", str(job))  # cycle 0 trains on them and selects 3 images
    assert load_state(str(run)).status == "awaiting_labels"
    out = invoke(*push, "--min-score", "0.05")
    assert "pushed 3 tasks" in out and "3 new" in out
    record = storage.read_json(push_record_uri(layout.cycle(0, "labels.json")))
    assert record["url"] == labelstudio.url and record["project"]["title"] == "digits" and record["set"] == "selection"
    selected = storage.read_parquet(layout.cycle(0, "selected.parquet")).column("image_id").to_pylist()
    assert [t["image_id"] for t in record["tasks"]] == selected
    client = labelstudio.client()
    offered = 0
    for pushed in record["tasks"]:
        task = client.tasks.get(pushed["task"])
        assert task.data["almdn_image_id"] == pushed["image_id"] and task.data["almdn_cycle"] == 0
        (prediction,) = client.predictions.list(task=task.id)
        assert prediction.model_version == "almdn-ray cycle 0"
        offered += len(prediction.result)
    assert offered > 0 and f"{offered} pre-annotations" in out
    out = invoke("labels", "pull", str(run), code=3)  # nobody has labelled yet
    assert "3 of 3 tasks still unlabelled" in out and not storage.exists(layout.cycle(0, "labels.json"))
    annotate(labelstudio, push_record_uri(layout.cycle(0, "labels.json")), truth, classes)
    assert f"imported {sum(len(truth[i].labels) for i in selected)} boxes on 3 images" in invoke(
        "labels", "pull", str(run)
    )
    assert_stored_truth(layout.cycle(0, "labels.json"), truth, selected)

    assert "finished" in invoke("run", str(job))
    assert sorted(labeled_ids(layout, 1)) == sorted(
        [t["image_id"] for t in storage.read_json(initial)["tasks"]] + selected
    )
    out = invoke("labels", "pull", str(run), code=1)  # the same cycle again, after `run` moved on
    tasks = [t["task"] for t in record["tasks"]]
    assert f"Label Studio tasks {tasks} of project 'digits'" in out and "it is now finished" in out
    assert all(token not in path.read_bytes().decode(errors="ignore") for path in run.rglob("*") if path.is_file())


def test_pull_refuses_naming_the_task_and_writes_nothing(labelstudio, demo, tmp_path, monkeypatch):
    run = tmp_path / "run"
    spec, recorder, driver, selected = waiting_run(demo, run)  # cycle 0 waits for 5 labels (stage functions faked)
    truth = {r.image_id: r for r in demo["truth"].records}
    classes, labels = demo["truth"].classes, RunLayout(str(run)).cycle(0, "labels.json")
    (tmp_path / "token").write_text(labelstudio.token + "\n")  # the legacy token, from a file
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    push = ["labels", "push", str(run), "--labelstudio", labelstudio.url, "--project", "refusals"]
    push += ["--document-root", str(labelstudio.root), "--token-file", str(tmp_path / "token"), "--no-predictions"]
    pull = ["labels", "pull", str(run), "--token-file", str(tmp_path / "token")]
    assert "pushed 5 tasks" in invoke(*push)
    record = storage.read_json(push_record_uri(labels))
    (first, second) = record["tasks"][:2]

    client = labelstudio.client()  # the person adds a class to the project, and draws it
    project = client.projects.get(record["project"]["id"])
    client.projects.update(
        project.id, label_config=project.label_config.replace("</Rect", '<Label value="truck"/></Rect')
    )
    made = annotate(labelstudio, push_record_uri(labels), truth, classes, wrong={first["image_id"]: "truck"})
    out = invoke(*pull, code=1)
    assert f"task {first['task']} (" in out and f"(image {first['image_id']})" in out
    assert "category 'truck' is not a class of the run" in out and "nothing imported" in out
    assert not storage.exists(labels)

    record_of_first = truth[first["image_id"]]  # fixed in Label Studio; another task deleted there
    fixed = [region(record_of_first, b, classes[n - 1]) for b, n in zip(record_of_first.boxes, record_of_first.labels)]
    client.annotations.update(made[first["task"]], result=fixed)
    client.tasks.delete(str(second["task"]))
    out = invoke(*pull, code=1)
    assert f"task {second['task']} (image {second['image_id']}) is missing from the project" in out
    assert not storage.exists(labels)

    out = invoke(*push)  # a second push recreates the deleted task only
    assert "1 new, 4 already there" in out
    again = storage.read_json(push_record_uri(labels))["tasks"]
    (recreated,) = [t for t in again if t["image_id"] == second["image_id"]]
    assert recreated["task"] != second["task"] and [t["task"] for t in again if t != recreated] == [
        t["task"] for t in record["tasks"] if t != second
    ]
    client.annotations.create(
        recreated["task"],
        result=[region(truth[second["image_id"]], b, classes[n - 1]) for b, n in zip(
            truth[second["image_id"]].boxes, truth[second["image_id"]].labels)],
    )  # fmt: skip
    invoke(*pull)
    assert_stored_truth(labels, truth, [r.image_id for r in selected])
    assert Driver(spec, recorder.functions()).run().status == "finished"


def test_a_bad_token_is_refused_without_showing_it_and_the_url_is_kept_without_credentials(
    labelstudio, demo, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    job = job_file(tmp_path / "job.yaml", demo, run)
    invoke("run", str(job))  # waits for the initial set
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-the-token-4242")
    out = invoke("labels", "push", str(run), "--labelstudio", labelstudio.url, "--project", "digits", code=1)
    assert "refused to identify the token's user: HTTP 401" in out and "not-the-token-4242" not in out
    monkeypatch.delenv("LABEL_STUDIO_API_KEY")
    assert "no Label Studio token: set LABEL_STUDIO_API_KEY or give --token-file" in invoke(
        "labels", "pull", str(run), code=1
    )
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    out = invoke("labels", "pull", str(run), code=1)
    assert "nothing was pushed to Label Studio for the initial set of cycle 0: push it first" in out
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(LabelStudioError, match="is empty"):
        read_token(tmp_path / "empty")
    assert public_url("https://me:secret@ls.example.com:8443/?token=x#y") == "https://ls.example.com:8443"
    with pytest.raises(LabelStudioError, match="not a Label Studio URL"):
        public_url("ls.example.com")
    assert list(run.glob("cycles/*/*labelstudio*")) == []


def test_local_images_without_a_known_document_root_are_refused_not_guessed(tmp_path):
    from almdn_ray.data.records import ImageRecord
    from almdn_ray.labelstudio import _image_urls

    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))
    records = [
        ImageRecord("a", f"file://{tmp_path}/x/a.jpg", 4, 4, *empty),
        ImageRecord("b", "/data/y/b.jpg", 4, 4, *empty),
    ]
    with pytest.raises(LabelStudioError, match="give --document-root, the server's LOCAL_FILES_DOCUMENT_ROOT"):
        _image_urls(records, None, None)
    names, folder = _image_urls(records[:1], str(tmp_path), None)
    assert names == {"a": "x/a.jpg"} and folder == f"{tmp_path}/x"  # a file:// URI is a local path too
