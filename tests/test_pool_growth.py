"""`pool add`: what it refuses (and names)."""

import pytest
from typer.testing import CliRunner

from almdn_ray.cli import app
from almdn_ray.cycle import Driver, RunLayout
from almdn_ray.data.manifest import MARKER, read_manifest
from tests.test_cycle import Recorder
from tests.test_pool import manifest_job, synthetic_manifest, test_split  # noqa: F401 (a fixture)

cli = CliRunner()


@pytest.fixture
def started(tmp_path, test_split):  # noqa: F811
    """A human-labelled run of 30 images, waiting for its initial labels; its job."""
    spec = manifest_job(tmp_path / "run", synthetic_manifest(tmp_path / "manifest", 30), test_split)
    assert Driver(spec, Recorder().functions()).run().status == "awaiting_labels"
    return str(tmp_path / "run"), spec


def pool_ids(run):
    return read_manifest(RunLayout(run).pool).column("image_id").to_pylist()


def test_a_manifest_that_pool_build_did_not_finish_is_refused_as_run_refuses_it(started, tmp_path):
    run, _ = started
    half = synthetic_manifest(tmp_path / "half", 5, prefix="week2")
    (tmp_path / "half" / MARKER).unlink()  # an interrupted `pool build`
    result = cli.invoke(app, ["pool", "add", run, half])
    assert result.exit_code == 1, result.output
    assert f"{half} has manifest shards but no {MARKER}: `pool build` did not finish; run the same" in result.output
    assert len(pool_ids(run)) == 30
