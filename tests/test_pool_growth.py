"""`pool add`: what it refuses (and names), and ids prefixed so that a new week's file names can repeat."""

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from almdn_ray.cli import app
from almdn_ray.cycle import Driver, RunLayout
from almdn_ray.data.manifest import MARKER, read_manifest, read_marker
from almdn_ray.pool_growth import PoolAddError, add_to_pool
from tests.conftest import encode_image, random_image
from tests.test_cycle import Recorder
from tests.test_pool import manifest_job, synthetic_manifest, test_split  # noqa: F401 (a fixture)

cli = CliRunner()


@pytest.fixture
def started(tmp_path, test_split):  # noqa: F811
    """A human-labelled run of 30 images, waiting for its initial labels; its job."""
    spec = manifest_job(tmp_path / "run", synthetic_manifest(tmp_path / "manifest", 30), test_split)
    assert Driver(spec, Recorder().functions()).run().status == "awaiting_labels"
    return str(tmp_path / "run"), spec


def images(folder, *names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        (folder / name).write_bytes(encode_image(random_image(8, 6, seed=seed + n)))


def pool_ids(run):
    return read_manifest(RunLayout(run).pool).column("image_id").to_pylist()


def test_a_manifest_that_pool_build_did_not_finish_is_refused_as_run_refuses_it(started, tmp_path):
    run, _ = started
    half = synthetic_manifest(tmp_path / "half", 5, prefix="week2")
    (tmp_path / "half" / MARKER).unlink()  # an interrupted `pool build`
    result = cli.invoke(app, ["pool", "add", run, half])
    assert result.exit_code == 1, result.output
    assert f"{half} has manifest-*.parquet shards but no {MARKER}, so it is not a sealed" in result.output
    assert "`almdn-ray pool build` wrote them, it did not finish: run the same command again" in result.output
    assert len(pool_ids(run)) == 30


def test_an_image_without_an_id_is_refused_with_its_row(started):
    run, job = started
    rows = {"image_id": ["new/1", None], "uri": ["/x/1.png", "/x/2.png"], "width": [8, 8], "height": [6, 6]}
    with pytest.raises(PoolAddError, match=r"new.json: 1 row\(s\) have no image_id \(null or empty\): 1;"):
        add_to_pool(run, job, pa.table(rows), "new.json")
    assert len(pool_ids(run)) == 30


def test_an_image_already_in_the_pool_under_another_id_is_refused_by_uri(started, tmp_path):
    run, _ = started
    images(tmp_path / "imgs" / "week2", "a.png", "b.png")
    images(tmp_path / "imgs", "c.png", seed=5)
    assert cli.invoke(app, ["pool", "add", run, str(tmp_path / "imgs" / "week2")]).exit_code == 0
    result = cli.invoke(app, ["pool", "add", run, str(tmp_path / "imgs")])  # week2/a is a again
    assert result.exit_code == 1
    uri = tmp_path / "imgs" / "week2" / "a.png"
    assert f"2 image(s) are already in the pool under another id: ['{uri}' (as 'a')" in result.output
    assert pool_ids(run)[-2:] == ["a", "b"] and len(pool_ids(run)) == 32


def test_an_id_prefix_lets_a_new_week_repeat_the_file_names(started, tmp_path):
    run, _ = started
    images(tmp_path / "week1", "IMG_0001.png")
    images(tmp_path / "week2", "IMG_0001.png", seed=3)
    assert cli.invoke(app, ["pool", "add", run, str(tmp_path / "week1")]).exit_code == 0
    refused = cli.invoke(app, ["pool", "add", run, str(tmp_path / "week2")])
    assert refused.exit_code == 1 and "already in the pool: ['IMG_0001']" in refused.output
    assert "--id-prefix" in refused.output  # the fix is named
    result = cli.invoke(app, ["pool", "add", run, str(tmp_path / "week2"), "--id-prefix", "week2/"])
    assert result.exit_code == 0, result.output
    assert pool_ids(run)[-2:] == ["IMG_0001", "week2/IMG_0001"]
    assert read_marker(RunLayout(run).pool)["additions"][-1]["id_prefix"] == "week2/"


def test_a_listing_of_new_keys_is_added_without_sizes(started, tmp_path):
    run, _ = started
    listing = tmp_path / "week2.csv"
    listing.write_text("object_key,bytes\nraw/week2/a.jpg,10\nraw/week2/b.jpg,11\n")
    result = cli.invoke(
        app, ["pool", "add", run, str(listing), "--uri-column", "object_key", "--uri-prefix", "s3://bucket/"]
    )
    assert result.exit_code == 0, result.output
    added = read_manifest(RunLayout(run).pool).slice(30).to_pydict()
    assert added == {
        "image_id": ["raw/week2/a", "raw/week2/b"],
        "uri": ["s3://bucket/raw/week2/a.jpg", "s3://bucket/raw/week2/b.jpg"],
        "width": [None, None],
        "height": [None, None],
    }
