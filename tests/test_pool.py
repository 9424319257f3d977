"""Pools as manifests: no labels yet (human cold start), complete-or-nothing manifests, pools that grow."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from almdn_ray import storage
from almdn_ray.cli import app
from almdn_ray.config import SpecError, spec_from_dict
from almdn_ray.cycle import Driver, RunLayout, labeled_ids
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.data.manifest import (
    MARKER,
    build_image_manifest,
    read_manifest,
    read_marker,
    write_manifest_table,
)
from almdn_ray.data.records import DatasetError
from almdn_ray.report import run_status
from almdn_ray.state import load_state
from tests.conftest import encode_image, random_image
from tests.test_cycle import Recorder

cli = CliRunner()
CLASSES = ["cat", "dog"]


def synthetic_manifest(
    folder: Path, n: int, *, prefix: str = "img", rows_per_shard: int = 2_500, uri_root: str | None = None
) -> str:
    """A pool manifest in `pool build`'s schema; its images are real 64 x 48 PNGs beside it (``uri_root``:
    URIs under a root that is never read instead)."""
    ids = [f"{prefix}/{i:07d}" for i in range(n)]
    if uri_root is None:
        images = folder.parent / f"{folder.name}-images"
        data = encode_image(random_image(64, 48, seed=1))
        for i in ids:
            (images / i).parent.mkdir(parents=True, exist_ok=True)
            (images / f"{i}.png").write_bytes(data)
        uris = [str(images / f"{i}.png") for i in ids]
    else:
        uris = [f"{uri_root}/{i}.jpg" for i in ids]
    table = pa.table(
        {
            "image_id": ids,
            "uri": uris,
            "width": pa.array([64] * n, pa.int32()),
            "height": pa.array([48] * n, pa.int32()),
        }
    )
    write_manifest_table(table, str(folder), rows_per_shard=rows_per_shard)
    return str(folder)


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    path = tmp_path_factory.mktemp("test") / "test.json"
    (path.parent / "t.png").write_bytes(encode_image(random_image(64, 64)))
    image = {"id": 1, "file_name": "t.png", "width": 64, "height": 64}
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9]}
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    path.write_text(json.dumps({"images": [image], "annotations": [annotation], "categories": categories}))
    return str(path)


def manifest_job(run, manifest, test, **extra):
    return spec_from_dict(
        {
            "storage": {"uri": str(run)},
            "dataset": {"train": manifest, "test": test, "classes": CLASSES},
            "acquisition": {"initial_labeled": 50, "budget": 20, "cycles": 2},
            "labels": {"mode": "human"},
            **extra,
        }
    )


def label_what_is_awaited(run, tmp_path, name):
    """`labels export`, then a COCO file giving every exported image one box, through `labels import`."""
    result = cli.invoke(app, ["labels", "export", str(run)])
    assert result.exit_code == 0, result.output
    skeleton = json.loads(Path(result.output.split("coco labels file: ")[1].split("\n")[0]).read_text())
    skeleton["annotations"] = [
        {"id": n, "image_id": image["id"], "category_id": 1 + n % 2, "bbox": [10, 10, 30, 30]}
        for n, image in enumerate(skeleton["images"], start=1)
    ]
    (tmp_path / name).write_text(json.dumps(skeleton))
    result = cli.invoke(app, ["labels", "import", str(run), str(tmp_path / name)])
    assert result.exit_code == 0, result.output
    return [image["almdn_image_id"] for image in skeleton["images"]]


def test_a_10000_image_pool_without_labels_starts_by_labelling_its_initial_set(tmp_path, test_split):
    manifest = synthetic_manifest(tmp_path / "manifest", 10_000)
    run = tmp_path / "run"
    spec, recorder = manifest_job(run, manifest, test_split), Recorder()
    state = Driver(spec, recorder.functions()).run()
    assert (state.status, state.cycle, state.stage) == ("awaiting_labels", 0, "train") and recorder.calls == []
    layout = RunLayout(str(run))
    assert read_marker(layout.pool)["rows"] == 10_000 and layout.pool_marker.endswith(MARKER)
    initial = label_what_is_awaited(run, tmp_path, "initial.json")
    assert len(initial) == 50 and sorted(initial) == labeled_ids(layout, 0)
    csv_rows = storage.read_bytes(layout.cycle(0, "export", "to_label.csv")).decode().splitlines()
    assert len(csv_rows) == 51
    state = Driver(spec, recorder.functions()).run()
    assert (state.status, state.cycle, state.stage) == ("awaiting_labels", 0, "label")
    trained = recorder.train_records[0]
    assert [r.image_id for r in trained] == sorted(initial)
    assert all(r.boxes.tolist() == [[10, 10, 40, 40]] for r in trained)  # the imported boxes
    scored = read_manifest(layout.cycle(0, "unlabeled")).column("image_id").to_pylist()
    assert len(scored) == len(set(scored)) == 10_000 - 50 and not set(scored) & set(initial)
    selected = label_what_is_awaited(run, tmp_path, "cycle0.json")
    assert len(selected) == 20
    state = Driver(spec, recorder.functions()).run()
    assert state.status == "finished" and ("train", "cycle-001") in recorder.calls
    assert {r.image_id for r in recorder.train_records[1]} == set(initial) | set(selected)
    result = cli.invoke(app, ["status", str(run)])
    assert result.exit_code == 0 and "pool: 10000 images" in result.output


def test_a_simulation_run_needs_the_labels_of_every_pool_image(tmp_path, test_split):
    manifest = synthetic_manifest(tmp_path / "manifest", 30)
    spec = manifest_job(tmp_path / "run", manifest, test_split, labels={"mode": "simulate"})
    with pytest.raises(SpecError, match=r"30 of the 30 pool images have no labels .* set labels.mode: human"):
        Driver(spec, Recorder().functions()).run()


def test_an_unfinished_pool_build_is_not_taken_for_a_pool(tmp_path, test_split):
    manifest = synthetic_manifest(tmp_path / "manifest", 30, rows_per_shard=10)
    (tmp_path / "manifest" / MARKER).unlink()
    with pytest.raises(
        ValueError,
        match=r"no _MANIFEST.json, so it is not a sealed pool manifest. If `almdn-ray pool build` wrote them, it did "
        "not finish",
    ):
        Driver(manifest_job(tmp_path / "run", manifest, test_split), Recorder().functions()).run()
    assert not (tmp_path / "run" / "pool").exists()


def test_a_manifest_with_the_labels_that_exist_matches_them_by_id_or_uri(tmp_path, test_split):
    from almdn_ray.data.pool import load_pool

    manifest = synthetic_manifest(tmp_path / "manifest", 30, uri_root="s3://bucket")
    coco = {
        "images": [{"id": 7, "file_name": "img/0000003.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [1, 2, 3, 4]}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (tmp_path / "labels.json").write_text(json.dumps(coco))

    def dataset(**extra):
        keys = {"train": manifest, "labels": str(tmp_path / "labels.json"), "test": test_split, **extra}
        return spec_from_dict({"dataset": keys}).dataset

    with pytest.raises(
        DatasetError, match=r"1 labelled image\(s\) are not in the pool manifest \(by id or URI\), e.g. 7; add"
    ):
        load_pool(dataset())  # relative to the JSON's folder, the file is not the pool's s3://bucket/img/...
    pool = load_pool(dataset(train_image_root="s3://bucket"))
    assert len(pool) == 30 and pool.classes == ("cat", "dog")
    assert list(pool.labels) == ["img/0000003"] and pool.labels["img/0000003"].labels.tolist() == [2]
    assert len(pool.unlabelled_ids()) == 29


KILLED_DRIVER = """
import sys, time
from almdn_ray import cycle, storage
from almdn_ray.config import spec_from_dict
from tests.test_cycle import Recorder

cycle.POOL_ROWS_PER_SHARD = 10
written = []
original = storage.write_parquet
def slow_write(uri, table, **kwargs):  # the manifest write of a driver that dies in it
    original(uri, table, **kwargs)
    if "/pool/manifest-" in uri:
        written.append(uri)
        if len(written) == 2:
            print("two shards written", flush=True)
            time.sleep(600)
storage.write_parquet = slow_write
spec = spec_from_dict({spec!r})
cycle.Driver(spec, Recorder().functions()).run()
"""


def test_a_driver_killed_while_it_writes_the_pool_manifest_resumes_with_the_whole_pool(tmp_path):
    paths = build_demo(
        tmp_path / "demo", pool_images=40, test_images=4, config=DemoConfig(image_size=64, digit_size=(20, 40))
    )
    run = tmp_path / "run"
    data = {
        "storage": {"uri": str(run)},
        "dataset": {"train": str(paths["pool"]), "test": str(paths["test"])},
        "acquisition": {"initial_labeled": 10, "budget": 5, "cycles": 3},
    }
    script = textwrap.dedent(KILLED_DRIVER).replace("{spec!r}", repr(data))
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        assert process.stdout.readline().strip() == "two shards written"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    layout = RunLayout(str(run))
    assert len(storage.list_files(layout.pool, pattern="manifest-*.parquet")) == 2
    assert read_marker(layout.pool) is None  # not committed
    recorder = Recorder()
    state = Driver(spec_from_dict(data), recorder.functions()).run()
    assert state.status == "finished"
    assert read_marker(layout.pool)["rows"] == 40 and read_manifest(layout.pool).num_rows == 40
    for k in range(2):  # cycles 0 and 1 score; the last cycle (2) only trains and evaluates
        scored = read_manifest(layout.cycle(k, "unlabeled")).column("image_id").to_pylist()
        labelled = labeled_ids(layout, k)
        assert len(scored) == len(set(scored)) and sorted(scored + labelled) == sorted(str(i) for i in range(1, 41))


def test_a_manifest_whose_rows_disagree_with_its_marker_is_refused(tmp_path):
    folder = synthetic_manifest(tmp_path / "m", 100, rows_per_shard=40)
    (tmp_path / "m" / "manifest-00002.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="a shard of the manifest .* is missing"):
        read_manifest(folder)
    marker = json.loads((tmp_path / "m" / MARKER).read_text())
    marker["shards"] = marker["shards"][:2]
    (tmp_path / "m" / MARKER).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="the shards hold 80 rows but the manifest's marker .* says 100"):
        read_manifest(folder)


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"im{i:03d}.png").write_bytes(encode_image(random_image(8 + i, 6, seed=i)))
    (folder / "im999.png").write_bytes(b"not an image")


def test_pool_build_resumes_reading_only_the_chunks_not_written(tmp_path):
    _images(tmp_path / "images", 24)
    out = str(tmp_path / "manifest")
    calls = []

    def crash_after_one(function, args):
        for a in args:
            calls.append(a[2])
            if len(calls) == 2:
                raise OSError("the machine went away")
            yield function(*a)

    with pytest.raises(OSError, match="went away"):
        build_image_manifest(str(tmp_path / "images"), out, rows_per_shard=10, map_chunks=crash_after_one)
    assert read_marker(out) is None and len(storage.list_files(out, pattern="manifest-*.parquet")) == 1
    first = (tmp_path / "manifest" / "manifest-00000.parquet").stat().st_mtime_ns
    (tmp_path / "images" / "late.png").write_bytes(encode_image(random_image(5, 5)))  # not in the build's listing
    calls.clear()
    shards, skipped = build_image_manifest(str(tmp_path / "images"), out, rows_per_shard=10)
    assert len(shards) == 3 and len(skipped) == 1 and "im999.png" in skipped[0]
    assert (tmp_path / "manifest" / "manifest-00000.parquet").stat().st_mtime_ns == first  # not read again
    table = read_manifest(out)
    assert table.num_rows == 24 == read_marker(out)["rows"]
    assert table.column("image_id").to_pylist() == [f"im{i:03d}" for i in range(24)]
    assert table.column("width").to_pylist() == [8 + i for i in range(24)]


def test_pool_build_reads_headers_in_ray_tasks(tmp_path, ray_session):
    _images(tmp_path / "images", 12)
    out = str(tmp_path / "manifest")
    result = cli.invoke(app, ["pool", "build", str(tmp_path / "images"), out, "--rows-per-shard", "5", "--ray"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 shard(s)" in result.output and "skipped:" in result.output
    assert read_manifest(out).column("image_id").to_pylist() == [f"im{i:03d}" for i in range(12)]
    again = cli.invoke(app, ["pool", "build", str(tmp_path / "images"), out])
    assert again.exit_code == 1 and "already holds a complete manifest" in again.output


def test_pool_add_grows_the_pool_for_the_next_cycle_and_refuses_known_ids(tmp_path, test_split):
    manifest = synthetic_manifest(tmp_path / "manifest", 200)
    run = tmp_path / "run"
    acquisition = {"initial_labeled": 50, "budget": 20, "cycles": 3}
    spec, recorder = manifest_job(run, manifest, test_split, acquisition=acquisition), Recorder()
    Driver(spec, recorder.functions()).run()
    label_what_is_awaited(run, tmp_path, "initial.json")
    assert Driver(spec, recorder.functions()).run().stage == "label"  # cycle 0 scored and selected
    layout = RunLayout(str(run))
    new = synthetic_manifest(tmp_path / "new", 30, prefix="week2")
    result = cli.invoke(app, ["pool", "add", str(run), new])
    assert result.exit_code == 0, result.output
    assert "added 30 images to the pool (now 230)" in result.output
    assert read_manifest(layout.pool).num_rows == 230
    assert load_state(str(run)).history[-1]["stage"] == "pool add"
    # Ids already there, labelled or selected are refused by name, and nothing is added.
    labelled, selected = labeled_ids(layout, 0)[:2], storage.read_parquet(layout.cycle(0, "selected.parquet"))
    again = pa.table(
        {
            "image_id": ["week2/0000001", labelled[0], selected.column("image_id")[0].as_py(), "fresh/1"],
            "uri": ["a", "b", "c", "d"],
            "width": pa.array([1] * 4, pa.int32()),
            "height": pa.array([1] * 4, pa.int32()),
        }
    )
    write_manifest_table(again, str(tmp_path / "again"))
    result = cli.invoke(app, ["pool", "add", str(run), str(tmp_path / "again")])
    assert result.exit_code == 1
    assert "2 image id(s) are already labelled or selected for labelling" in result.output
    assert labelled[0] in result.output and "1 image id(s) are already in the pool: ['week2/0000001']" in result.output
    assert read_manifest(layout.pool).num_rows == 230
    label_what_is_awaited(run, tmp_path, "cycle0.json")
    state = Driver(spec, recorder.functions()).run()
    assert (state.status, state.cycle, state.stage) == ("awaiting_labels", 1, "label")
    scored = read_manifest(layout.cycle(1, "unlabeled")).column("image_id").to_pylist()
    assert {f"week2/{i:07d}" for i in range(30)} <= set(scored)  # the new images are scored in cycle 1
    assert len(scored) == 230 - len(labeled_ids(layout, 1))
    assert run_status(str(run))["pool_additions"][0]["rows"] == 30
