"""Faults injected: bad images in the labelled set and the test split, and a driver SIGKILLed many times."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from almdn_ray import storage
from almdn_ray.cli import app
from almdn_ray.config import spec_from_dict
from almdn_ray.cycle import Driver, RunLayout, labeled_ids
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.state import load_state
from tests.test_cycle import Recorder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo(tmp_path):
    return build_demo(
        tmp_path / "demo", pool_images=30, test_images=4, config=DemoConfig(image_size=64, digit_size=(20, 40))
    )


def test_unreadable_labelled_and_test_images_are_left_out_counted_and_shown(demo, tmp_path):
    spec = spec_from_dict(
        {
            "storage": {"uri": str(tmp_path / "run")},
            "dataset": {"train": str(demo["pool"]), "test": str(demo["test"])},
            "acquisition": {"initial_labeled": 10, "budget": 5, "cycles": 2},
        }
    )
    recorder = Recorder()
    driver = Driver(spec, recorder.functions())
    driver._prepare()
    first = labeled_ids(RunLayout(str(tmp_path / "run")), 0)[0]
    bad = {r.image_id: r for r in driver.pool.labels.values()}[first]
    Path(bad.uri).write_bytes(Path(bad.uri).read_bytes()[:100])  # truncated
    Path(driver.test.records[0].uri).unlink()  # a test image gone
    assert Driver(spec, recorder.functions()).run().status == "finished"
    assert first not in {r.image_id for r in recorder.train_records[0]} and len(recorder.train_records[0]) == 9
    layout = RunLayout(str(tmp_path / "run"))
    assert list(storage.read_json(layout.cycle(0, "train-unreadable.json"))) == [first]
    assert storage.read_json(layout.cycle(0, "metrics.json"))["unreadable_test_images"] == 1
    status = CliRunner().invoke(app, ["status", str(tmp_path / "run")])
    assert "unreadable images left out: 1 train, 1 test" in status.output
    validate = CliRunner().invoke(app, ["data", "validate", str(demo["pool"])])
    assert validate.exit_code == 1 and bad.uri in validate.output


# ---- the driver SIGKILLed at random moments -----------------------------------------------------------------
DRIVER = """
import json, os, signal, sys
from almdn_ray import cycle, storage
from almdn_ray.config import spec_from_dict
from almdn_ray.labels import awaited_ids, import_labels
from tests.test_faults import DeterministicStages

cycle.POOL_ROWS_PER_SHARD = 8  # the frozen pool in several shards: a kill can fall inside its write
rule = os.environ.get("KILL_RULE", "")
writes, matches = [0], [0]
original = storage.write_bytes
def write_bytes(uri, data, **kwargs):  # the driver dies just before a write: inside a stage or a commit
    writes[0] += 1
    kind, _, rest = rule.partition(":")
    if kind == "count" and writes[0] == int(rest):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "match":
        text, _, nth = rest.rpartition(":")
        if text in uri:
            matches[0] += 1
            if matches[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
    return original(uri, data, **kwargs)
storage.write_bytes = write_bytes
spec = spec_from_dict(json.loads(sys.argv[1]))
while True:
    state = cycle.Driver(spec, DeterministicStages(spec.storage.uri).functions()).run()
    if state.status != "awaiting_labels":
        break
    pool = cycle.Driver(spec, DeterministicStages(spec.storage.uri).functions()).pool
    wanted = set(awaited_ids(spec.storage.uri))  # the labellers label what was exported: its true boxes
    truth = json.load(open(sys.argv[2]))
    done = {
        "images": [i for i in truth["images"] if str(i["id"]) in wanted],
        "annotations": [a for a in truth["annotations"] if str(a["image_id"]) in wanted],
        "categories": truth["categories"],
    }
    path = os.path.join(spec.storage.uri, "from-the-labellers.json")
    with open(path, "w") as stream:
        json.dump(done, stream)
    import_labels(spec.storage.uri, path, pool)
print("done", writes[0])
"""


class DeterministicStages:
    """The real stage bodies in one process, without Ray (a real model trained, the pool scored, the test
    split evaluated; deterministic on one CPU), each call noted in ``calls.log`` with whether its stage was
    already finished (in the history) when it was called."""

    def __init__(self, run):
        self.run = run

    def _note(self, stage, cycle):
        state = load_state(self.run)
        done = state is not None and any(h["cycle"] == cycle and h["stage"] == stage for h in state.history)
        with open(os.path.join(self.run, "calls.log"), "a") as log:
            log.write(json.dumps({"stage": stage, "cycle": cycle, "redone": done}) + "\n")

    def train(self, records, spec, job, storage_uri, run_name, init):
        import io

        import torch

        from almdn_ray.data.transforms import DetectionDataset, train_transform
        from almdn_ray.training import LocalContext, train_worker

        self._note("train", int(run_name.split("-")[1]))
        torch.set_num_threads(1)
        dataset = DetectionDataset(records, train_transform(spec.input_size, flip=job.train.flip))
        model = train_worker(spec=spec, dataset=dataset, recipe=job.train, context=LocalContext())
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        storage.write_bytes(storage.join(storage_uri, "model.pt"), buffer.getvalue())
        return storage.join(storage_uri, "model.pt")

    def score(self, manifest, weights, out, spec, job, member_uris=()):
        import torch

        from almdn_ray import scoring
        from almdn_ray.data.manifest import read_manifest

        self._note("score", int(out.split("/cycles/")[1][:3]))
        torch.set_num_threads(1)
        model = scoring.load_model(spec, weights)
        table = scoring.score_table(model, read_manifest(manifest), config=job.acquisition.postprocess())
        storage.write_parquet(storage.join(out, "part-00000.parquet"), table)

    def evaluate(self, weights, dataset, spec, job):
        import torch

        from almdn_ray import evaluation, scoring

        self._note("eval", int(weights.split("/cycles/")[1][:3]))
        torch.set_num_threads(1)
        return evaluation.evaluate(scoring.load_model(spec, weights), dataset, log_every=0)

    def functions(self):
        from almdn_ray.cycle import StageFunctions

        return StageFunctions(train=self.train, score=self.score, evaluate=self.evaluate)


def _human_job(demo, run):
    return {
        "storage": {"uri": str(run)},
        "dataset": {"train": str(demo["pool"]), "test": str(demo["test"])},
        "acquisition": {"initial_labeled": 8, "budget": 4, "cycles": 3, "min_confidence": 0.05},
        "labels": {"mode": "human"},
        "model": {"preset": "ssdlite320_mobilenet_v3", "image_size": 64},
        "train": {
            "max_iterations": 4,
            "batch_size": 4,
            "optimizer": "adam",
            "warmup_iterations": 1,
            "checkpoint_every": 4,
            "precise_bn_batches": 0,
            "lr_steps": [100],
        },  # fmt: skip
    }


def _drive(job, truth, rule=""):
    env = {**os.environ, "KILL_RULE": rule, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER), json.dumps(job), truth],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _outcome(run):
    layout = RunLayout(str(run))
    state = load_state(str(run))
    out = {"status": state.status, "stages": [(h["cycle"], h["stage"]) for h in state.history]}
    for k in range(3):
        out[f"labeled-{k}"] = labeled_ids(layout, k)
        if storage.exists(layout.cycle(k, "selected.parquet")):
            out[f"selected-{k}"] = storage.read_parquet(layout.cycle(k, "selected.parquet")).to_pylist()
        if storage.exists(layout.cycle(k, "labels.json")):
            out[f"labels-{k}"] = storage.read_json(layout.cycle(k, "labels.json"))
        metrics = storage.read_json(layout.cycle(k, "metrics.json"))
        out[f"metrics-{k}"] = {key: metrics[key] for key in ("map_voc07", "map_area", "coco", "labeled", "cycle")}
        out[f"model-{k}"] = hashlib.sha1(storage.read_bytes(layout.cycle(k, "train", "model.pt"))).hexdigest()
    return out


@pytest.mark.slow
def test_a_driver_killed_at_eight_random_moments_ends_as_an_uninterrupted_run(demo, tmp_path):
    pool = json.loads(Path(demo["pool"]).read_text())
    for image in pool["images"]:
        image["almdn_image_id"] = str(image["id"])
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(pool))
    reference = _drive(_human_job(demo, tmp_path / "reference"), str(truth))
    assert reference.returncode == 0, reference.stderr[-3000:]
    rng = random.Random(11)
    # Seeded moments: inside the frozen pool's write, inside a labels import (after its report, before its
    # labels), and six more anywhere (inside stages and between them, counted in writes of each process).
    writes = int(reference.stdout.split()[-1])
    rules = ["match:/pool/manifest-:2"] + rng.sample(
        ["match:/labels.json:1"] + [f"count:{rng.randint(2, writes // 12)}" for _ in range(6)], 7
    )
    run = tmp_path / "killed"
    for rule in rules:
        done = _drive(_human_job(demo, run), str(truth), rule)
        assert done.returncode == -signal.SIGKILL, (rule, writes, done.returncode, done.stderr[-2000:])
    final = _drive(_human_job(demo, run), str(truth))
    assert final.returncode == 0, final.stderr[-3000:]
    assert _outcome(run) == _outcome(tmp_path / "reference")
    history = load_state(str(run)).history
    assert len(history) == len({(h["cycle"], h["stage"]) for h in history})  # each stage finished once
    calls = [json.loads(line) for line in (run / "calls.log").read_text().splitlines()]
    assert calls and not [c for c in calls if c["redone"]]  # no finished stage was run again
    labelled = [labeled_ids(RunLayout(str(run)), k) for k in range(3)]
    assert all(len(ids) == len(set(ids)) for ids in labelled) and len(labelled[2]) == 8 + 4 + 4
