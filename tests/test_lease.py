"""One driver per run, fenced: conditional writes, tokens, expiry by renewals, a loser that stops."""

import json
import threading
import time
from pathlib import Path

import pytest

from almdn_ray import storage
from almdn_ray.config import SpecError, spec_from_dict
from almdn_ray.cycle import Driver
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.state import Lease, LeaseError, LeaseLost, RunState, load_state, save_state
from tests.test_cycle import Recorder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(
        tmp_path_factory.mktemp("demo"),
        pool_images=20,
        test_images=2,
        config=DemoConfig(image_size=64, digit_size=(20, 40)),
    )


def small_job(demo, run):
    return spec_from_dict(
        {
            "storage": {"uri": str(run)},
            "dataset": {"train": str(demo["pool"]), "test": str(demo["test"])},
            "acquisition": {"initial_labeled": 5, "budget": 3, "cycles": 2},
        }
    )


def test_an_unrenewed_lease_of_another_machine_expires_on_this_clock_and_tokens_grow(demo, tmp_path):
    lease_uri = storage.join(str(tmp_path), "lease.json")
    far_future = {
        "owner": "elsewhere:42:abc",
        "token": 7,
        "machine": "elsewhere",
        "pid": 42,
        "ttl_s": 1.0,
        "expires_at": time.time() + 10**6,
    }  # fmt: skip  its clock (or its skew) is not consulted
    storage.write_json(lease_uri, far_future)
    start = time.monotonic()
    assert Driver(small_job(demo, tmp_path), Recorder().functions()).run().status == "finished"
    assert time.monotonic() - start >= 1.0  # it watched for a renewal for the lease's ttl first
    released = json.loads(storage.read_bytes(lease_uri))
    assert released["owner"] is None and released["token"] == 8  # released, unowned: the next token is 9
    assert load_state(str(tmp_path)).token == 8


def test_a_renewed_lease_is_refused_and_a_taken_one_stops_its_driver_before_it_commits(tmp_path):
    live = Lease(str(tmp_path), ttl_s=1.5)
    live.acquire()
    try:
        other = Lease(str(tmp_path), ttl_s=1.5)
        other.machine = "another-container"  # cannot see whether the owner's process is alive
        with pytest.raises(LeaseError, match=r"owned by driver .* which is renewing its lease"):
            other.acquire()
        live._stop.set()  # the owner stalls: no more renewals
        live._thread.join()
        other.acquire()  # after 1.5 s without a renewal
        assert other.token == live.token + 1
        with pytest.raises(LeaseLost, match=r"was taken by .* stopped before committing"):
            live.check()
        save_state(str(tmp_path), RunState(run_id="r"), other)
        with pytest.raises(LeaseLost):
            save_state(str(tmp_path), RunState(run_id="r", cycle=5), live)
        assert load_state(str(tmp_path)).cycle == 0 and load_state(str(tmp_path)).token == other.token
    finally:
        other.release()
        live.release()  # a lost lease is not released over the new owner's
    assert json.loads(storage.read_bytes(storage.join(str(tmp_path), "lease.json")))["token"] == other.token


class SlowRecorder(Recorder):
    def train(self, *args, **kwargs):
        if not self.calls:  # the winner is still in its first TRAIN when the loser looks (and sees a renewal)
            time.sleep(1.0)
        return super().train(*args, **kwargs)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_started_together_twenty_times_exactly_one_runs(demo, tmp_path, where, request, monkeypatch):
    import almdn_ray.state

    monkeypatch.setattr(almdn_ray.state, "DEFAULT_TTL_S", 1.5)
    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    for attempt in range(20):
        spec = small_job(demo, f"{base}/run-{attempt}")
        barrier, outcomes = threading.Barrier(2), []

        def drive(spec=spec, barrier=barrier, outcomes=outcomes):
            barrier.wait()
            try:
                outcomes.append(Driver(spec, SlowRecorder().functions()).run().status)
            except LeaseError as error:
                outcomes.append(type(error).__name__)

        threads = [threading.Thread(target=drive) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(outcomes) == ["LeaseError", "finished"], (attempt, outcomes)
        history = load_state(spec.storage.uri).history
        assert len(history) == len({(h["cycle"], h["stage"]) for h in history})  # no stage done twice


def test_a_resume_with_changed_labels_of_trained_images_is_refused_naming_them(demo, tmp_path):
    pool = json.loads(open(demo["pool"]).read())
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    spec = spec_from_dict(
        {
            "storage": {"uri": str(tmp_path / "run")},
            "dataset": {
                "train": str(tmp_path / "pool.json"),
                "train_image_root": str(Path(demo["pool"]).parent),
                "test": str(demo["test"]),
            },
            "acquisition": {"initial_labeled": 5, "budget": 3, "cycles": 3},
        }
    )
    with pytest.raises(RuntimeError, match="lost its worker"):
        Driver(spec, Recorder(fail_train="cycle-001").functions()).run()
    trained = storage.read_parquet(str(tmp_path / "run" / "cycles" / "000" / "labeled.parquet"))
    victim = trained.column("image_id")[0].as_py()
    for ann in pool["annotations"]:
        if str(ann["image_id"]) == victim:
            ann["bbox"] = [1, 1, 5, 5]  # someone edits the dataset in place
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    with pytest.raises(
        SpecError, match=rf"labels of 1 image\(s\) this run already trained on have changed since: {victim} "
    ):
        Driver(spec, Recorder().functions()).run()
    recorder = Recorder()
    assert Driver(spec, recorder.functions(), accept_changed_labels=True).run().status == "finished"
    retrained = {r.image_id: r for r in recorder.train_records[0]}
    assert retrained[victim].boxes.tolist()[0] == [1, 1, 6, 6]  # the next cycles train on the new labels
    assert victim in storage.read_json(str(tmp_path / "run" / "labels-accepted.json"))  # accepted once, for good
