"""Shared fixtures: an S3-compatible server (moto, on 127.0.0.1) and small image helpers."""

from __future__ import annotations

import io
import os
import uuid

import numpy as np
import pytest
from PIL import Image

# Ray reads these when it is imported: set them before any test module imports it. The clusters and drivers
# that tests start in subprocesses (`ray start`, cluster_shapes.py, killed drivers) inherit them from os.environ.
RAY_TEST_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # else each report() waits ~2 s for the controller's poll
    "RAY_TRAIN_COLLECTIVE_TIMEOUT_S": "120",
    "RAY_DEDUP_LOGS": "0",
    # Fixed costs on 2 cores, none of which a test is about: ray.data.read_parquet starts 32 footer-reader actors
    # (processes) per pipeline by default (~5 s each score_pool here; one reads a test's few footers as well), and
    # each Ray Train run a preemption-watcher actor (~2 s; no test drains a node while training).
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
for _key, _value in RAY_TEST_ENV.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free loopback port; AWS variables point the code at it for the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint
    )
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; yields its ``s3://name`` URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


def encode_image(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def random_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole run (2 CPUs). Started after the S3 server so its workers see the AWS
    variables that point at it."""
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.execution_options.verbose_progress = False
    context.execution_no_progress_timeout_s = 120
    # Actor pools start work once all their actors are up: which actor scores which block is then not a race
    # against a slow actor start (tests assert that every actor took part).
    context.wait_for_min_actors_s = 120
    yield ray
    ray.shutdown()
