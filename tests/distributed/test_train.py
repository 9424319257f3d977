import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from almdn_ray import storage
from almdn_ray.model import ModelSpec
from almdn_ray.training import TrainRecipe
from tests.distributed.helpers import SIZE, write_scenes

SPEC = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=SIZE)


def recipe(**overrides):
    base = dict(
        max_iterations=12,
        batch_size=4,
        lr=0.02,
        warmup_iterations=2,
        lr_steps=(),
        checkpoint_every=4,
        augment=False,
        precise_bn_batches=2,
        divergence_factor=1e6,
    )
    return TrainRecipe(**{**base, **overrides})


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"), 8)


def test_two_worker_ddp_trains_in_sync_and_resumes_from_storage(ray_session, records, tmp_path):
    from almdn_ray.distributed.train import train_distributed

    result = train_distributed(
        records=records,
        spec=SPEC,
        recipe=recipe(),
        storage_uri=str(tmp_path / "train"),
        run_name="cycle-000",
        num_workers=2,
    )
    metrics = result.metrics
    assert metrics["iteration"] == 12 and metrics["start_iteration"] == 0
    assert metrics["loss"] < 0.8 * metrics["initial_loss"], metrics
    assert metrics["weight_spread"] == 0.0  # both ranks hold the same weights after every step
    state = torch.load(result.model_uri, weights_only=True)
    SPEC.build().load_state_dict(state)  # a plain state_dict of the model
    # The whole call again, asked for more iterations: it resumes from the checkpoint in storage.
    again = train_distributed(
        records=records,
        spec=SPEC,
        recipe=recipe(max_iterations=16),
        storage_uri=str(tmp_path / "train"),
        run_name="cycle-000",
        num_workers=2,
    )
    assert again.metrics["start_iteration"] == 12 and again.metrics["iteration"] == 16


def _train_workers() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_a_killed_worker_is_replaced_and_continues_from_the_checkpoint(ray_session, records, tmp_path):
    from almdn_ray.distributed.train import train_distributed

    out: dict = {}
    run = threading.Thread(
        target=lambda: out.update(
            result=train_distributed(
                records=records,
                spec=SPEC,
                recipe=recipe(max_iterations=60, checkpoint_every=5),
                storage_uri=str(tmp_path / "train"),
                run_name="cycle-001",
                num_workers=2,
                max_failures=1,
            )
        )
    )
    run.start()
    run_folder = tmp_path / "train" / "cycle-001"
    deadline = time.time() + 120
    # Wait for the second checkpoint: by then the first one is registered with the controller.
    while time.time() < deadline and len(list(run_folder.glob("checkpoint_*"))) < 2:
        time.sleep(0.05)
    victims = _train_workers()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    run.join(timeout=300)
    result = out["result"]
    assert result.metrics["iteration"] == 60
    assert result.metrics["start_iteration"] > 0  # the replacement group resumed, not from zero


def test_checkpoints_and_weights_live_in_s3(ray_session, records, s3_bucket):
    from almdn_ray.distributed.train import train_distributed

    uri = f"{s3_bucket}/run/cycles/000/train"
    result = train_distributed(
        records=records,
        spec=SPEC,
        recipe=recipe(max_iterations=4, checkpoint_every=2),
        storage_uri=uri,
        run_name="cycle-000",
        num_workers=1,
    )
    assert result.model_uri == f"{uri}/model.pt" and storage.exists(result.model_uri)
    assert any("/cycle-000/checkpoint_" in f for f in storage.list_files(uri))


def test_a_backbone_file_that_does_not_fit_is_refused_by_the_driver_before_any_worker(ray_session, records, tmp_path):
    from dataclasses import replace

    from almdn_ray.distributed.train import train_distributed
    from almdn_ray.model.backbones import BackboneWeightsError

    bad = tmp_path / "not_a_mobilenet.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    start = time.monotonic()
    with pytest.raises(BackboneWeightsError, match="not_a_mobilenet.pth"):
        train_distributed(
            records=records, spec=replace(SPEC, backbone_weights=str(bad)), recipe=recipe(),
            storage_uri=str(tmp_path / "train"), run_name="cycle-000",
        )  # fmt: skip
    assert time.monotonic() - start < 10  # no Ray Train start-up (~15-20 s) was paid
    assert not (tmp_path / "train").exists()
