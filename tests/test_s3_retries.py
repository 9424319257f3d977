"""S3 that throttles, resets and loses answers: every storage call retries through it (pyarrow's and boto3's own
retry strategies), and a conditional write whose answer was lost still knows it won."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from almdn_ray import storage
from almdn_ray.config import SpecError, spec_from_dict
from almdn_ray.data.images import image_size, read_image
from tests.conftest import encode_image, random_image
from tests.faulty_s3 import FaultyS3


@pytest.fixture
def restore_storage_settings():
    saved = storage.settings()
    yield
    storage.configure(**saved)


@pytest.fixture
def proxy(s3_endpoint, restore_storage_settings):
    with FaultyS3(s3_endpoint, failure_share=0.0, seed=7) as faulty:
        storage.configure(endpoint=faulty.endpoint)
        yield faulty


def test_reads_and_writes_through_an_endpoint_failing_25_percent_of_requests_lose_nothing(proxy, s3_bucket):
    proxy.failure_share = 0.25
    proxy.plan.extend(["slowdown", "reset_before", "reset_after"])  # each kind at least once, whatever the draws
    run = f"{s3_bucket}/run"
    for i in range(4):
        storage.write_json(f"{run}/state-{i}.json", {"cycle": i})
    table = pa.table({"image_id": [f"img-{i}" for i in range(500)], "score": np.linspace(-1, 1, 500)})
    storage.write_parquet(f"{run}/scores/part-0.parquet", table)
    picture = random_image(40, 30, seed=3)
    storage.write_bytes(f"{run}/images/a.png", encode_image(picture))

    proxy.plan.extend([None, "slowdown"])  # a 503 body larger than the file read: the SDK's INTERNAL_FAILURE
    assert storage.read_json(f"{run}/state-0.json") == {"cycle": 0}
    assert [storage.read_json(f"{run}/state-{i}.json") for i in range(4)] == [{"cycle": i} for i in range(4)]
    assert storage.read_parquet(f"{run}/scores/part-0.parquet").equals(table)
    assert np.array_equal(read_image(f"{run}/images/a.png").permute(1, 2, 0).numpy(), picture)
    assert image_size(f"{run}/images/a.png") == (40, 30)
    assert len(storage.list_files(run, pattern="state-*.json")) == 4  # none lost, none doubled
    storage.delete(f"{run}/scores")
    assert not storage.exists(f"{run}/scores/part-0.parquet") and storage.exists(f"{run}/state-0.json")
    assert all(proxy.faults[kind] > 0 for kind in ("slowdown", "reset_before", "reset_after")), proxy.faults
    assert sum(proxy.faults.values()) >= 0.1 * sum(proxy.requests.values())


def test_a_conditional_write_whose_answer_was_lost_knows_it_won(proxy, s3_bucket):
    lease = f"{s3_bucket}/run/lease.json"
    proxy.plan.append("reset_after")  # S3 creates it, the answer is lost, boto3 retries and gets 412
    assert storage.create_exclusive(lease, b'{"owner": "a", "nonce": "1"}')
    version = storage.read_versioned(lease)[1]
    proxy.plan.append("reset_after")
    assert storage.replace_if(lease, b'{"owner": "a", "nonce": "2"}', version)
    assert storage.read_versioned(lease)[0] == b'{"owner": "a", "nonce": "2"}'
    # Another writer's conditions still fail, lost answers or not.
    proxy.plan.append("reset_after")
    assert not storage.create_exclusive(lease, b'{"owner": "b", "nonce": "3"}')
    proxy.plan.append("reset_before")
    assert not storage.replace_if(lease, b'{"owner": "b", "nonce": "4"}', version)  # a stale version
    assert storage.read_versioned(lease)[0] == b'{"owner": "a", "nonce": "2"}'
    assert proxy.faults == {"reset_after": 3, "reset_before": 1}


def test_an_answer_that_stalls_past_the_read_timeout_is_retried(proxy, s3_bucket):
    uri = f"{s3_bucket}/run/state.json"
    storage.write_json(uri, {"cycle": 1})
    storage.configure(endpoint=proxy.endpoint, read_timeout_s=0.5)
    proxy.stall_s = 2.0
    proxy.plan.extend([None, "stall"])  # pyarrow: the HEAD answered, the GET stalls
    assert storage.read_json(uri) == {"cycle": 1}
    proxy.plan.append("stall")  # boto3
    assert storage.read_versioned(uri)[0] == storage.read_bytes(uri)
    assert proxy.faults == {"stall": 2}


def test_max_attempts_bounds_both_sdks_survives_pickling_and_the_error_names_the_fix(proxy, s3_bucket, monkeypatch):
    uri = f"{s3_bucket}/run/state.json"
    storage.write_json(uri, {"cycle": 0})
    proxy.failure_share, proxy.kinds = 1.0, {"slowdown": 1.0}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the standard variable, when the job names no max_attempts
    fs, _ = storage.resolve(uri)
    for read in (storage.read_bytes, storage.read_versioned):
        proxy.requests.clear()
        with pytest.raises(storage.StorageError, match=r"state.json: S3 throttled every one of 2 attempts.*max_att"):
            read(uri)
        assert sum(proxy.requests.values()) == 2, read
    proxy.requests.clear()
    with pytest.raises(OSError, match="503"):
        pickle.loads(pickle.dumps(fs)).get_file_info(uri.removeprefix("s3://"))  # as a Ray task gets it
    assert sum(proxy.requests.values()) == 2  # pyarrow's own pickling would make it 3
    storage.configure(endpoint=proxy.endpoint, max_attempts=3)  # the job's storage.max_attempts wins
    proxy.requests.clear()
    with pytest.raises(storage.StorageError, match="every one of 3 attempts"):
        storage.read_bytes(uri)
    assert sum(proxy.requests.values()) == 3
    proxy.failure_share = 0.0
    assert storage.read_json(uri) == {"cycle": 0}


def test_retry_settings_are_validated_and_may_change_on_resume(tmp_path, restore_storage_settings):
    with pytest.raises(SpecError, match="storage.max_attempts must be at least 1"):
        spec_from_dict({"storage": {"uri": str(tmp_path), "max_attempts": 0}})
    with pytest.raises(SpecError, match="storage.read_timeout_s must be a positive number"):
        spec_from_dict({"storage": {"uri": str(tmp_path), "read_timeout_s": 0}})
    from almdn_ray.cycle import Driver
    from tests.test_cycle import Recorder

    first = spec_from_dict({"storage": {"uri": str(tmp_path / "run"), "max_attempts": 3}})
    Driver(first, Recorder().functions())._freeze_job()
    again = spec_from_dict({"storage": {"uri": str(tmp_path / "run"), "max_attempts": 20, "connect_timeout_s": 5}})
    Driver(again, Recorder().functions())._freeze_job()  # a throttled run resumes with more attempts
    assert storage.settings()["max_attempts"] == 20 and storage.settings()["connect_timeout_s"] == 5
    changed = spec_from_dict({"storage": {"uri": str(tmp_path / "run")}, "seed": 1})
    with pytest.raises(SpecError, match=r"changed keys: \['seed'\]"):
        Driver(changed, Recorder().functions())._freeze_job()
