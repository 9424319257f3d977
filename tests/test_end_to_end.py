"""The product end to end on real Ray: a driver killed at three points and resumed, a Ray Job submitted to a
`ray start --head` cluster on 127.0.0.1, and a run whose storage is an S3 bucket (moto).

Ray Train and Ray Data start-ups dominate these tests (about 20 s and 10 s each on 2 cores), so each run is
paid once: the uninterrupted run in S3 (``tiny_run``) is also the reference the killed run must end equal to.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from almdn_ray import storage
from almdn_ray.cli import app
from almdn_ray.cycle import RunLayout, labeled_ids
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.state import load_state
from tests.conftest import RAY_TEST_ENV

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(**auth):
    """`ray start --head --block` on 127.0.0.1 with its own ports; stopped by its process (group) id."""
    from ray.job_submission import JobSubmissionClient

    gcs, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        **RAY_TEST_ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # The cluster's own S3 credentials (moto takes any); no endpoint: a job must bring storage.endpoint.
        "AWS_ACCESS_KEY_ID": "cluster-key-id",
        "AWS_SECRET_ACCESS_KEY": "cluster-secret",
        "AWS_REGION": "us-east-1",
        **auth,
    }
    for key in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        env.pop(key, None)
    ports = [
        "--port",
        str(gcs),
        "--dashboard-port",
        str(dashboard),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
    ]
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--dashboard-host",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            *ports,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    headers = {"Authorization": f"Bearer {auth['RAY_AUTH_TOKEN']}"} if "RAY_AUTH_TOKEN" in auth else None
    deadline = time.time() + 90
    while True:
        try:
            JobSubmissionClient(address, headers=headers).list_jobs()
            break
        except Exception:
            if time.time() > deadline or head.poll() is not None:
                stop_head(head)
                raise
            time.sleep(0.5)
    return head, {"gcs": f"127.0.0.1:{gcs}", "dashboard": address, "env": env}


def stop_head(head: subprocess.Popen) -> None:
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


@pytest.fixture(scope="module")
def cluster():
    head, info = start_head()
    yield info
    stop_head(head)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(
        tmp_path_factory.mktemp("demo"),
        pool_images=40,
        test_images=8,
        config=DemoConfig(image_size=96, digit_size=(24, 48), small_fraction=0.0),
    )


def write_job(path: Path, demo, run_uri: str, *, cycles: int = 2, endpoint: str | None = None) -> Path:
    spec = {
        "name": "e2e",
        "seed": 3,
        "storage": {"uri": run_uri, "endpoint": endpoint},
        "dataset": {"train": str(demo["pool"]), "test": str(demo["test"])},
        "model": {"preset": "ssdlite320_mobilenet_v3", "image_size": 96},
        "train": {
            "max_iterations": 8,  # two checkpoints: the first is the kill point inside TRAIN
            "batch_size": 4,
            "optimizer": "adam",
            "lr": 0.003,
            "warmup_iterations": 2,
            "lr_steps": [],
            "checkpoint_every": 4,
            "flip": False,
            "precise_bn_batches": 2,
        },
        "acquisition": {"initial_labeled": 10, "budget": 6, "cycles": cycles, "min_confidence": 0.05},
        "resources": {"num_workers": 1, "scoring_batch_size": 4, "eval_batch_size": 8},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def start_driver(job: Path, cluster, log: Path, **extra_env) -> subprocess.Popen:
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"], "ALMDN_RAY_PROGRESS": "0", **extra_env}
    return subprocess.Popen(
        [sys.executable, "-m", "almdn_ray", "run", str(job)],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_until(condition, process, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the driver ended before the kill point"
        assert time.time() < deadline, "the kill point was never reached"
        time.sleep(0.05)


def stages_entered(log: Path) -> list[str]:
    return [
        line.split("] ", 1)[1]
        for line in log.read_text().splitlines()
        if line.startswith("[almdn-ray] cycle") and line.count(":") == 1
    ]


@pytest.fixture(scope="module")
def tiny_run(ray_session, s3_endpoint, demo, tmp_path_factory) -> str:
    """The job uninterrupted (two cycles), its storage in an S3 bucket (moto), with the Ray stages in this
    process: checked by test_a_tiny_run_with_its_storage_in_s3, and the reference for the killed run (the
    stages are deterministic on the same 2-CPU worker shape, wherever the storage and the driver are)."""
    import boto3

    from almdn_ray.config import load_spec
    from almdn_ray.cycle import Driver
    from almdn_ray.distributed.stages import ray_stage_functions

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    run = f"s3://{bucket}/runs/tiny"
    spec = load_spec(write_job(tmp_path_factory.mktemp("tiny") / "job.yaml", demo, run))
    assert Driver(spec, ray_stage_functions()).run().status == "finished"
    return run


def test_a_driver_killed_in_train_in_score_and_after_select_resumes_to_the_same_result(
    cluster, demo, tiny_run, tmp_path
):
    run = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", demo, str(run))
    layout = RunLayout(str(run))
    logs = [tmp_path / f"attempt{i}.log" for i in range(4)]

    driver = start_driver(job, cluster, logs[0])  # 1. inside TRAIN, once a checkpoint exists
    wait_until(lambda: any((run / "cycles" / "000" / "train" / "cycle-000").glob("checkpoint_*")), driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    driver = start_driver(job, cluster, logs[1])  # 2. inside SCORE, once its manifest is written
    wait_until(lambda: storage.exists(layout.cycle(0, "unlabeled")), driver)
    time.sleep(1.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert load_state(str(run)).stage == "score"
    driver = start_driver(job, cluster, logs[2], ALMDN_RAY_PAUSE_AFTER_STAGE="select")  # 3. right after SELECT
    wait_until(lambda: (load_state(str(run)) or None) and load_state(str(run)).stage == "label", driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    driver = start_driver(job, cluster, logs[3])
    assert driver.wait(timeout=600) == 0, logs[3].read_text()[-3000:]

    assert stages_entered(logs[1])[0] == "cycle 0: train"  # training had not finished: resumed
    assert stages_entered(logs[2])[0] == "cycle 0: score"  # train and eval were not run again
    assert stages_entered(logs[3])[0] == "cycle 0: label"  # select was not run again
    state = load_state(str(run))
    done = [(h["cycle"], h["stage"]) for h in state.history]
    assert state.status == "finished" and len(done) == len(set(done)) == 7
    expected = RunLayout(tiny_run)  # the same job, never interrupted
    for k in range(2):
        assert labeled_ids(layout, k) == labeled_ids(expected, k)
    assert len(set(labeled_ids(layout, 1))) == 16  # 10 + 6, none twice


def upload(folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def test_submit_with_storage_endpoint_runs_on_s3_and_sends_no_credentials(
    cluster, demo, s3_endpoint, s3_bucket, tmp_path
):
    # Dataset, images and run all in S3; the cluster knows no endpoint (only its own keys), the job names it.
    upload(Path(demo["pool"]).parent, f"{s3_bucket}/demo")
    run = f"{s3_bucket}/runs/submitted"
    job = write_job(tmp_path / "job.yaml", demo, run, cycles=1, endpoint=s3_endpoint)
    spec = yaml.safe_load(job.read_text())
    spec["dataset"] = {"train": f"{s3_bucket}/demo/pool.json", "test": f"{s3_bucket}/demo/test.json"}
    job.write_text(yaml.safe_dump(spec))
    laptop = {
        "AWS_ACCESS_KEY_ID": "laptop-key-id-4242",
        "AWS_SECRET_ACCESS_KEY": "laptop-secret-4242",
        "AWS_SESSION_TOKEN": "laptop-session-4242",
        "AWS_ENDPOINT_URL": None,
        "RAY_AUTH_MODE": "disabled",
    }
    result = runner.invoke(
        app,
        ["submit", str(job), "--address", cluster["dashboard"], "--wait", "--submission-id", "almdn-s3-endpoint"],
        env=laptop,
    )
    assert result.exit_code == 0, result.output
    assert "status: SUCCEEDED" in result.output
    assert "the cluster must provide S3 credentials" in result.output
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(cluster["dashboard"]).get_job_info("almdn-s3-endpoint")
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "list", "--address", cluster["dashboard"]],
        env={**cluster["env"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    stored = repr((info.runtime_env, info.metadata, info.entrypoint)) + listed.stdout
    assert "almdn-s3-endpoint" in listed.stdout
    for secret in ("laptop-key-id-4242", "laptop-secret-4242", "laptop-session-4242", "AWS_SECRET_ACCESS_KEY"):
        assert secret not in stored
    status = runner.invoke(app, ["status", run, "--endpoint", s3_endpoint], env={"AWS_ENDPOINT_URL": None})
    assert status.exit_code == 0, status.output
    assert "finished" in status.output and "cycle 0: 10 labelled, done: train, eval" in status.output
    metrics = storage.read_json(RunLayout(run).cycle(0, "metrics.json"))
    assert metrics["num_images"] == 8 and metrics["eval_node"]  # EVAL ran as a Ray task


def test_a_tiny_run_with_its_storage_in_s3(tiny_run):
    run = tiny_run
    assert load_state(run).status == "finished"
    layout = RunLayout(run)
    assert storage.exists(layout.cycle(1, "train", "model.pt"))
    assert any("/cycle-001/checkpoint_" in f for f in storage.list_files(layout.cycle(1, "train")))
    assert storage.read_parquet(layout.cycle(0, "selected.parquet")).num_rows == 6
    assert len(labeled_ids(layout, 1)) == 16
    report = runner.invoke(app, ["report", run])
    assert report.exit_code == 0, report.output
    assert storage.exists(f"{run}/report/curve.png") and storage.exists(f"{run}/report/report.md")
    assert f"page: {run}/report/report.html" in report.output  # the page, on S3 beside report.md
    page = storage.read_bytes(f"{run}/report/report.html").decode()
    picked = storage.read_parquet(layout.cycle(0, "selected.parquet")).column("image_id").to_pylist()
    assert all(f'"id":"{image_id}"' in page for image_id in picked) and "data:image/jpeg;base64," in page


def test_a_run_over_s3_failing_10_percent_of_requests_ends_equal_to_the_run_without_faults(
    ray_session, s3_endpoint, demo, tiny_run, tmp_path
):
    """``tiny_run``'s job again, its storage behind a proxy that fails 10 % of requests (503 SlowDown, resets before
    and after S3 applied them): the driver, the Ray Train workers, the Ray Data tasks and the EVAL tasks all reach
    S3 through it. Cycle 1's model is ``tiny_run``'s, put in place before the start, so that its TRAIN is skipped
    as a resumed run skips it (a second Ray Train run costs ~25 s here; cycle 0 proves TRAIN under faults)."""
    import boto3

    from almdn_ray.config import load_spec
    from almdn_ray.cycle import Driver
    from almdn_ray.distributed.stages import ray_stage_functions
    from almdn_ray.reduce import read_scores
    from tests.faulty_s3 import FaultyS3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    layout, expected = RunLayout(f"s3://{bucket}/runs/faulty"), RunLayout(tiny_run)
    model_1 = storage.read_bytes(expected.cycle(1, "train", "model.pt"))
    storage.write_bytes(layout.cycle(1, "train", "model.pt"), model_1)
    saved = storage.settings()
    with FaultyS3(s3_endpoint, failure_share=0.1, seed=24) as proxy:
        try:
            spec = load_spec(write_job(tmp_path / "job.yaml", demo, layout.run, endpoint=proxy.endpoint))
            assert Driver(spec, ray_stage_functions()).run().status == "finished"
        finally:
            storage.configure(**saved)  # the tests after this one read moto directly
    assert all(proxy.faults[kind] > 0 for kind in ("slowdown", "reset_before", "reset_after")), proxy.faults
    assert sum(proxy.faults.values()) >= 0.05 * sum(proxy.requests.values()), (proxy.faults, proxy.requests)
    writes = [target for method, target in proxy.seen if method in ("PUT", "POST")]
    assert any("/cycle-000/checkpoint_" in t for t in writes)  # Ray Train's workers went through the faults
    assert any("/cycles/000/scores/" in t for t in writes)  # and Ray Data's writers
    assert any(m == "GET" and "/cycles/000/unlabeled/" in t for m, t in proxy.seen)  # and its readers

    history = [(h["cycle"], h["stage"]) for h in load_state(layout.run).history]
    assert history == [(h["cycle"], h["stage"]) for h in load_state(expected.run).history]
    assert len(history) == len(set(history)) == 7  # no stage done twice
    for k in range(2):
        assert labeled_ids(layout, k) == labeled_ids(expected, k)
        got, want = (storage.read_json(run.cycle(k, "metrics.json")) for run in (layout, expected))
        assert {key: got[key] for key in want if not key.startswith("eval_")} == {
            key: value for key, value in want.items() if not key.startswith("eval_")
        }
    assert storage.read_bytes(layout.cycle(0, "train", "model.pt")) == storage.read_bytes(
        expected.cycle(0, "train", "model.pt")
    )
    scores, reference = (
        read_scores(run.cycle(0, "scores")).sort_by("image_id").drop_columns(["seconds", "worker"])  # timing
        for run in (layout, expected)
    )
    assert scores.num_rows == len(set(scores.column("image_id").to_pylist())) == 30  # every unlabelled image once
    assert scores.equals(reference)
    assert storage.read_parquet(layout.cycle(0, "selected.parquet")).equals(
        storage.read_parquet(expected.cycle(0, "selected.parquet"))
    )


def test_submit_logs_and_stop_with_token_authentication(demo, tmp_path):
    token = "almdn-test-token-0123456789abcdef"
    head, info = start_head(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    try:
        job = write_job(tmp_path / "job.yaml", demo, str(tmp_path / "run"), cycles=1)
        refused = runner.invoke(app, ["submit", str(job), "--address", info["dashboard"]])
        assert refused.exit_code != 0  # no token: the cluster says no
        submitted = runner.invoke(
            app,
            [
                "submit",
                str(job),
                "--address",
                info["dashboard"],
                "--token",
                token,
                "--submission-id",
                "almdn-token-test",
            ],
        )
        assert submitted.exit_code == 0, submitted.output
        assert "submitted: almdn-token-test" in submitted.output
        stopped = runner.invoke(app, ["stop", "almdn-token-test", "--address", info["dashboard"], "--token", token])
        assert stopped.exit_code == 0, stopped.output
        logs = runner.invoke(app, ["logs", "almdn-token-test", "--address", info["dashboard"], "--token", token])
        assert logs.exit_code == 0, logs.output
    finally:
        stop_head(head)


def train_here(records, spec, job, storage_uri, run_name, init):
    """TRAIN in this process (train_worker, as each Ray Train worker runs it): the experiment's own Ray parts are
    its scoring actors and EVAL tasks; Ray Train in the cycle is run by the tests above, once per cycle each."""
    import io

    import torch

    from almdn_ray.data.transforms import DetectionDataset, eval_transform, train_transform
    from almdn_ray.training import LocalContext, train_worker

    recipe = job.train
    transform = (
        train_transform(spec.input_size, flip=recipe.flip) if recipe.augment else eval_transform(spec.input_size)
    )
    weights = torch.load(io.BytesIO(storage.read_bytes(init)), weights_only=True) if init else None
    model = train_worker(
        spec=spec, dataset=DetectionDataset(records, transform), recipe=recipe, context=LocalContext(),
        init_weights=weights,
    )  # fmt: skip
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    storage.write_bytes(storage.join(storage_uri, "model.pt"), buffer.getvalue())
    return storage.join(storage_uri, "model.pt")


def test_a_two_strategy_experiment_on_ray_writes_a_paired_table(ray_session, demo, tmp_path, monkeypatch):
    from dataclasses import replace

    from almdn_ray.distributed import stages

    on_ray = stages.ray_stage_functions
    monkeypatch.setattr(stages, "ray_stage_functions", lambda *a, **k: replace(on_ray(*a, **k), train=train_here))
    job = write_job(tmp_path / "job.yaml", demo, str(tmp_path / "unused"))
    spec = yaml.safe_load(job.read_text())
    spec["train"].update(max_iterations=4, checkpoint_every=2)
    spec["acquisition"].update(mc_passes=3)
    job.write_text(yaml.safe_dump(spec))
    out, report = tmp_path / "exp", tmp_path / "report"
    args = ["experiment", str(job), "--strategies", "almdn,mc_dropout", "--seeds", "1", "--out", str(out)]
    result = runner.invoke(app, [*args, "--report-to", str(report)])
    assert result.exit_code == 0, result.output
    table = storage.read_json(str(report / "experiment.json"))["table"]
    assert table["sizes"] == [10, 16] and table["pending"] == []
    assert [(row["strategy"], row["seeds"], sorted(row["map"])) for row in table["rows"]] == [
        ("almdn", [0], ["10", "16"]),
        ("mc_dropout", [0], ["10", "16"]),
    ]
    assert all(row["score_ms_per_image"] > 0 for row in table["rows"])
    lines = [line for line in (report / "experiment.md").read_text().splitlines() if line.startswith("| ")]
    assert len(lines) == 3 and lines[0].count("|") == 11  # header + 2 strategies; 10 columns
    assert (report / "experiment.png").read_bytes()[:4] == b"\x89PNG"
    first = [labeled_ids(RunLayout(str(out / s / "seed-0")), 0) for s in ("almdn", "mc_dropout")]
    assert len(first[0]) == 10 and first[0] == first[1]  # paired: the same initial labelled set
    selected = [
        set(labeled_ids(RunLayout(str(out / s / "seed-0")), 1)) - set(first[0]) for s in ("almdn", "mc_dropout")
    ]
    assert all(len(s) == 6 for s in selected)
    scores = storage.read_parquet(str(next((out / "mc_dropout/seed-0/cycles/000/scores").glob("*.parquet"))))
    assert scores.column("committee_n").to_numpy().sum() > 0  # the Ray actors ran the dropout passes
