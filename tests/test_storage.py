import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from almdn_ray import storage


@pytest.mark.parametrize("where", ["local", "file", "s3"])
def test_json_and_parquet_round_trip(where, tmp_path, request):
    base = {"local": str(tmp_path), "file": f"file://{tmp_path}", "s3": request.getfixturevalue("s3_bucket") + "/run"}[
        where
    ]
    storage.write_json(storage.join(base, "state.json"), {"cycle": 3, "stage": "score"})
    storage.write_json(storage.join(base, "state.json"), {"cycle": 4, "stage": "train"})  # replaced
    assert storage.read_json(storage.join(base, "state.json")) == {"cycle": 4, "stage": "train"}
    table = pa.table({"image_id": ["a", "b"], "score": [0.5, -1.0]})
    storage.write_parquet(storage.join(base, "cycles", "000", "selected.parquet"), table)
    assert storage.read_parquet(storage.join(base, "cycles", "000", "selected.parquet")).equals(table)
    assert storage.exists(storage.join(base, "state.json"))
    assert not storage.exists(storage.join(base, "nothing.json"))
    assert storage.list_files(base, pattern="*.parquet") == [storage.join(base, "cycles", "000", "selected.parquet")]
    storage.delete(storage.join(base, "cycles"))
    assert not storage.exists(storage.join(base, "cycles", "000", "selected.parquet"))


def test_local_replace_leaves_no_temporary_files(tmp_path):
    for i in range(5):
        storage.write_json(str(tmp_path / "state.json"), {"i": i})
    assert os.listdir(tmp_path) == ["state.json"]


def test_malformed_json_is_named(tmp_path):
    (tmp_path / "state.json").write_text('{"cycle": 1,\n "stage": }')
    with pytest.raises(storage.StorageError, match=r"state.json: malformed JSON at line 2, column 11"):
        storage.read_json(str(tmp_path / "state.json"))


def test_missing_bucket_is_named(s3_endpoint):
    with pytest.raises(storage.StorageError, match="s3://missing-bucket-x/run/state.json: the bucket does not exist"):
        storage.write_json("s3://missing-bucket-x/run/state.json", {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_credentials_are_named(tmp_path):
    # A moto server that checks credentials (its own process: moto's auth switch is process-wide).
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        with pytest.raises(storage.StorageError, match="credentials were refused: check AWS_ACCESS_KEY_ID"):
            storage.write_json("s3://some-bucket/run/state.json", {}, endpoint=f"http://127.0.0.1:{port}")
    finally:
        server.kill()
        server.wait()


def test_unreachable_endpoint_is_named(s3_endpoint, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the message, not the backoff (10 attempts: ~1 min; test_s3_retries)
    start = time.time()
    with pytest.raises(storage.StorageError, match="the endpoint could not be reached"):
        storage.read_bytes("s3://bucket/run/state.json", endpoint=endpoint)
    assert time.time() - start < 60
