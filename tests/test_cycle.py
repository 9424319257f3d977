"""The stage machine with local stand-ins for the heavy stages (the Ray ones are tested end to end elsewhere)."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
import yaml

from almdn_ray import acquisition, storage
from almdn_ray.config import SpecError, spec_from_dict, spec_to_dict
from almdn_ray.cycle import Driver, RunLayout, StageFunctions, labeled_ids
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.labels import LabelImportError, export_labels, import_labels
from almdn_ray.scoring import SCORE_SCHEMA
from almdn_ray.state import load_state


class Recorder:
    """Stage functions that record their calls; scores are a fixed function of the image id."""

    def __init__(self, fail_score_once=False, fail_train=None, burst=None):
        self.burst = burst  # embeddings: images 1..burst, burst+1..2*burst, ... are near-copies of one scene
        self.calls, self.train_records, self.fail_score_once = [], [], fail_score_once
        self.train_seeds, self.members, self.fail_train = [], [], fail_train

    def train(self, records, spec, job, storage_uri, run_name, init):
        if run_name == self.fail_train:
            self.fail_train = None
            raise RuntimeError(f"{run_name} lost its worker")
        self.calls.append(("train", run_name))
        self.train_records.append(records)
        self.train_seeds.append(job.train.seed)
        storage.write_bytes(storage.join(storage_uri, "model.pt"), b"weights")
        return storage.join(storage_uri, "model.pt")

    def score(self, manifest, weights, out, spec, job, member_uris=()):
        self.calls.append(("score", out))
        self.members.append(list(member_uris))
        assert all(storage.exists(uri) for uri in [weights, *member_uris])
        if self.fail_score_once:
            self.fail_score_once = False
            raise RuntimeError("worker lost")
        from almdn_ray.data.manifest import read_manifest

        ids = read_manifest(manifest).column("image_id").to_pylist()
        values = np.array(
            [[int(hashlib.md5(f"{i}{t}".encode()).hexdigest()[:6], 16) / 2**24 for t in range(4)] for i in ids]
        )
        index = np.arange(len(ids))
        rows = acquisition.summarize(index, values, len(ids), values[:, 0], committee=(index, values[:, 2:]))
        seeds = [int(hashlib.md5(i.encode()).hexdigest()[:8], 16) for i in ids]
        scenes = [(int(i) - 1) // self.burst if self.burst else s for i, s in zip(ids, seeds)]
        embeddings = [
            (np.random.default_rng(c).normal(size=16) + 1e-3 * np.random.default_rng(s).normal(size=16))
            .astype(np.float16)
            .tobytes()
            for c, s in zip(scenes, seeds)
        ]
        table = pa.table(
            {
                "image_id": ids,
                **rows,
                "top_class": [1 + s % 2 for s in seeds],
                "embedding": pa.array(embeddings, pa.binary()),
                "det_embedding": pa.array(embeddings, pa.binary()),  # one detection per image, as its image
                "seconds": [0.01] * len(ids),
                "error": [None] * len(ids),
                "worker": ["fake"] * len(ids),
            }
        )
        storage.write_parquet(storage.join(out, "part-0.parquet"), table.cast(SCORE_SCHEMA))

    def evaluate(self, weights, dataset, spec, job):
        self.calls.append(("eval", weights))
        return {"map_voc07": 0.1, "map_area": 0.1, "coco": {"AP": 0.05}}

    def functions(self):
        return StageFunctions(train=self.train, score=self.score, evaluate=self.evaluate)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(
        tmp_path_factory.mktemp("demo"),
        pool_images=40,
        test_images=4,
        config=DemoConfig(image_size=64, digit_size=(20, 40)),
    )


def job(demo, run, **acquisition_overrides):
    data = {
        "storage": {"uri": str(run)},
        "dataset": {"train": str(demo["pool"]), "test": str(demo["test"])},
        "acquisition": {"initial_labeled": 10, "budget": 5, "cycles": 3, **acquisition_overrides},
    }
    return spec_from_dict(data)


def test_cycles_grow_the_labelled_set_without_repeats(demo, tmp_path):
    recorder = Recorder()
    state = Driver(job(demo, tmp_path), recorder.functions()).run()
    assert state.status == "finished" and state.cycle == 2
    layout = RunLayout(str(tmp_path))
    sizes = [len(labeled_ids(layout, k)) for k in range(3)]
    assert sizes == [10, 15, 20]
    for k in range(2):
        assert set(labeled_ids(layout, k)) < set(labeled_ids(layout, k + 1))
    stages = [(h["cycle"], h["stage"]) for h in state.history]
    assert stages == [
        (0, "train"),
        (0, "eval"),
        (0, "score"),
        (0, "select"),
        (0, "label"),
        (1, "train"),
        (1, "eval"),
        (1, "score"),
        (1, "select"),
        (1, "label"),
        (2, "train"),
        (2, "eval"),
    ]
    assert [len(r) for r in recorder.train_records] == [10, 15, 20]
    assert storage.read_json(layout.cycle(2, "metrics.json"))["labeled"] == 20
    again = Recorder()
    assert Driver(job(demo, tmp_path), again.functions()).run().status == "finished" and again.calls == []


def test_a_run_resumes_under_the_spec_it_started_with_and_refuses_a_changed_one(demo, tmp_path):
    recorder = Recorder(fail_score_once=True)
    with pytest.raises(RuntimeError, match="worker lost"):
        Driver(job(demo, tmp_path), recorder.functions()).run()
    layout = RunLayout(str(tmp_path))
    frozen = yaml.safe_load(storage.read_bytes(layout.job))
    # written by an older version that had no acquisition.max_beta: the default fills it, the run resumes
    del frozen["acquisition"]["max_beta"]
    storage.write_bytes(layout.job, yaml.safe_dump(frozen, sort_keys=False).encode())
    with pytest.raises(SpecError, match=r"changed keys: \['acquisition.budget'\]"):
        Driver(job(demo, tmp_path, budget=7), Recorder().functions()).run()
    assert Driver(job(demo, tmp_path), Recorder().functions()).run().status == "finished"


def test_a_failed_stage_resumes_without_redoing_finished_ones(demo, tmp_path):
    recorder = Recorder(fail_score_once=True)
    with pytest.raises(RuntimeError, match="worker lost"):
        Driver(job(demo, tmp_path), recorder.functions()).run()
    assert load_state(str(tmp_path)).stage == "score"
    resumed = Recorder()
    Driver(job(demo, tmp_path), resumed.functions()).run()
    assert [c[0] for c in resumed.calls[:2]] == ["score", "train"]  # cycle 0's train and eval are not redone
    reference = Recorder()
    Driver(job(demo, tmp_path / "reference"), reference.functions()).run()
    for k in range(3):
        assert labeled_ids(RunLayout(str(tmp_path)), k) == labeled_ids(RunLayout(str(tmp_path / "reference")), k)


def test_a_changed_spec_is_refused_with_the_keys(demo, tmp_path):
    Driver(job(demo, tmp_path, cycles=1), Recorder().functions()).run()
    with pytest.raises(SpecError, match=r"changed keys: \['acquisition.budget', 'acquisition.cycles'\]"):
        Driver(job(demo, tmp_path, cycles=2, budget=7), Recorder().functions()).run()


def test_human_labelling_round_trip(demo, tmp_path):
    spec = spec_from_dict({**spec_to_dict(job(demo, tmp_path, cycles=2)), "labels": {"mode": "human"}})
    recorder = Recorder()
    state = Driver(spec, recorder.functions()).run()
    assert state.status == "awaiting_labels" and state.stage == "label"
    driver = Driver(spec, recorder.functions())
    paths = export_labels(str(tmp_path), driver.pool)
    json_uri, csv_uri = paths["labels"], paths["csv"]
    skeleton = storage.read_json(json_uri)
    assert len(skeleton["images"]) == 5 and skeleton["annotations"] == []
    assert storage.read_bytes(csv_uri).decode().splitlines()[0] == "image_id,uri,file_name,width,height"
    labelled = dict(skeleton)
    labelled["annotations"] = [
        {"id": n, "image_id": image["id"], "category_id": 3, "bbox": [2, 3, 20, 30]}
        for n, image in enumerate(skeleton["images"], start=1)
    ]
    bad = json.loads(json.dumps(labelled))
    bad["annotations"][1]["bbox"] = [50, 50, 30, 30]  # outside the 64x64 image
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(
        LabelImportError, match=r"annotation 2: box \[50.0, 50.0, 80.0, 80.0\] lies 16.0 px outside the 64x64 image"
    ):
        import_labels(str(tmp_path), str(tmp_path / "bad.json"), driver.pool)
    assert not storage.exists(RunLayout(str(tmp_path)).cycle(0, "labels.json"))  # nothing changed
    assert load_state(str(tmp_path)).status == "awaiting_labels"
    (tmp_path / "good.json").write_text(json.dumps(labelled))
    assert import_labels(str(tmp_path), str(tmp_path / "good.json"), driver.pool).boxes == 5
    state = Driver(spec, recorder.functions()).run()
    assert state.status == "finished"
    trained = {r.image_id: r for r in recorder.train_records[-1]}
    for image in skeleton["images"]:  # cycle 1 trained on the imported boxes, not the dataset's
        record = trained[image["almdn_image_id"]]
        assert record.labels.tolist() == [3] and record.boxes.tolist() == [[2, 3, 22, 33]]


def test_the_bundled_job_specs_are_valid():
    from pathlib import Path

    from almdn_ray.config import load_spec

    for path in sorted(Path(__file__).resolve().parents[1].glob("jobs/*.yaml")):
        spec = load_spec(path)
        assert spec.acquisition.cycles >= 1, path
    text = yaml.safe_dump({"acquisition": {"budgett": 5}})
    with pytest.raises(SpecError, match=r"acquisition: unknown key\(s\) \['budgett'\]"):
        spec_from_dict(yaml.safe_load(text), "x.yaml")


def test_an_exhausted_pool_selects_nothing_more(demo, tmp_path):
    state = Driver(job(demo, tmp_path, initial_labeled=36, budget=10, cycles=3), Recorder().functions()).run()
    assert state.status == "finished"
    layout = RunLayout(str(tmp_path))
    assert [len(labeled_ids(layout, k)) for k in range(3)] == [36, 40, 40]


def test_almdn_diverse_keeps_away_from_labelled_scenes_and_reports_classes(demo, tmp_path):
    from typer.testing import CliRunner

    from almdn_ray.cli import app
    from almdn_ray.data.manifest import read_manifest
    from almdn_ray.report import write_report

    recorder = Recorder(burst=2)  # 40 images: 20 scenes of 2 near-copies
    spec = job(demo, tmp_path, strategy="almdn_diverse", cycles=2, class_target="uniform", min_distance=0.05)
    assert Driver(spec, recorder.functions()).run().status == "finished"
    layout = RunLayout(str(tmp_path))
    scene = lambda image: (int(image) - 1) // 2  # noqa: E731
    labelled = {scene(i) for i in labeled_ids(layout, 0)}
    picked = storage.read_parquet(layout.cycle(0, "selected.parquet")).to_pydict()
    scenes = [scene(i) for i in picked["image_id"]]
    assert len(set(scenes)) == len(scenes)  # no two copies of one scene
    assert not set(scenes) & labelled  # and none of a labelled scene
    assert len(scenes) == 5
    # the whole pool was scored (the labelled images' embeddings are what keeps picks away from them)
    assert read_manifest(layout.cycle(0, "unlabeled")).num_rows == 40
    histogram = storage.read_json(layout.cycle(0, "selected-classes.json"))
    assert sum(histogram["classes"].values()) == len(scenes) and histogram["dropped_duplicates"] > 0
    assert set(histogram["classes"]) <= {"0", "1"} and set(picked["top_class"]) <= {1, 2}
    report = storage.read_bytes(write_report(str(tmp_path))["markdown"]).decode()
    assert "## Predicted classes of each selection" in report
    assert f"| 0 | {histogram['classes'].get('0', 0)} | {histogram['classes'].get('1', 0)} |" in report

    out = tmp_path / "duplicates.json"
    result = CliRunner().invoke(app, ["pool", "duplicates", str(tmp_path), "--cycle", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    groups = json.loads(out.read_text())["groups"]
    assert sorted(sorted(scene(r["image_id"]) for r in g) for g in groups) == [[s] * 2 for s in range(20)]
    assert all(r["uri"].endswith(".png") for g in groups for r in g)
    assert "20 groups of near-duplicates among 40 scored images" in result.output


def test_a_class_target_of_unknown_classes_is_refused_before_any_work(demo, tmp_path):
    recorder = Recorder()
    spec = job(demo, tmp_path, strategy="almdn_diverse", cycles=2, class_target={"0": 1, "sevn": 2})
    with pytest.raises(SpecError, match=r"acquisition.class_target names \['sevn'\].*choose among"):
        Driver(spec, recorder.functions()).run()
    assert recorder.calls == [] and not (tmp_path / "job.yaml").exists()  # nothing trained, nothing frozen


def test_a_run_frozen_with_a_misspelt_class_target_resumes_with_the_corrected_one(demo, tmp_path, caplog):
    corrected = job(demo, tmp_path, strategy="almdn_diverse", cycles=2, class_target={"0": 1, "7": 2})
    with pytest.raises(RuntimeError, match="worker lost"):
        Driver(corrected, Recorder(fail_score_once=True).functions()).run()
    layout = RunLayout(str(tmp_path))
    frozen = yaml.safe_load(storage.read_bytes(layout.job))
    frozen["acquisition"]["class_target"] = {"0": 1, "sevn": 2}  # as an older version froze it (it then stopped)
    storage.write_bytes(layout.job, yaml.safe_dump(frozen, sort_keys=False).encode())
    other = job(demo, tmp_path, strategy="almdn_diverse", cycles=2, class_target={"0": 1, "7": 2}, budget=7)
    with pytest.raises(SpecError, match=r"changed keys: \['acquisition.budget'\]"):  # only the target may change
        Driver(other, Recorder().functions()).run()
    resumed = Recorder()
    assert Driver(corrected, resumed.functions()).run().status == "finished"
    assert resumed.calls[0][0] == "score"  # cycle 0's training and evaluation are kept
    assert yaml.safe_load(storage.read_bytes(layout.job))["acquisition"]["class_target"] == {"0": 1, "7": 2}
    assert "acquisition.class_target corrected from {'0': 1, 'sevn': 2}" in caplog.text
    with pytest.raises(SpecError, match=r"changed keys: \['acquisition.class_target'\]"):  # a valid one may not
        Driver(
            job(demo, tmp_path, strategy="almdn_diverse", cycles=2, class_target="uniform"), Recorder().functions()
        ).run()


def test_random_selects_without_scoring_the_pool(demo, tmp_path):  # noqa: F811
    recorder = Recorder()
    spec = job(demo, tmp_path, strategy="random", cycles=3)
    assert Driver(spec, recorder.functions()).run().status == "finished"
    assert not [c for c in recorder.calls if c[0] == "score"]  # random needs no forward pass
    layout = RunLayout(str(tmp_path))
    for k in (0, 1):
        before = set(labeled_ids(layout, k))
        picked = storage.read_parquet(layout.cycle(k, "selected.parquet")).column("image_id").to_pylist()
        assert len(picked) == spec.acquisition.budget and not before & set(picked)
        assert set(labeled_ids(layout, k + 1)) == before | set(picked)
    again = tmp_path / "again"
    Driver(job(demo, again, strategy="random", cycles=3), Recorder().functions()).run()
    assert labeled_ids(RunLayout(str(again)), 2) == labeled_ids(layout, 2)  # seeded
