"""`pool build LISTING OUT`: a team's table of object keys (Parquet, CSV, JSON lines; local or S3) becomes a
pool manifest; bad listings are refused naming the rows, with nothing written; sizes the listing lacks are
read from the images by the stages that need them."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from almdn_ray import storage
from almdn_ray.cli import app
from almdn_ray.config import spec_from_dict
from almdn_ray.cycle import Driver, RunLayout
from almdn_ray.data.coco import read_coco, to_coco_dict
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.data.listing import ListingError, derived_ids, read_listing
from almdn_ray.data.manifest import MARKER, read_manifest, write_manifest_table
from almdn_ray.data.records import Dataset
from almdn_ray.labels import export_labels, import_labels
from tests.test_cycle import Recorder

runner = CliRunner()

# A team's export: its own column names, keys not URIs, no sizes, an extra column we ignore.
KEYS = [f"raw/cam-{c}/{n:06d}.jpg" for c in "ab" for n in range(7)]
TEAM = pa.table({"object_key": KEYS, "size_bytes": list(range(len(KEYS))), "camera": [k[4:9] for k in KEYS]})


def write_listing(table: pa.Table, kind: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":  # as Spark writes it: part files, a _SUCCESS marker and .crc files beside them
        for n, start in enumerate(range(0, table.num_rows, 5)):
            pq.write_table(table.slice(start, 5), folder / f"part-{n:05d}-3f2a.c000.snappy.parquet")
            (folder / f".part-{n:05d}-3f2a.c000.snappy.parquet.crc").write_bytes(b"crc")
        (folder / "_SUCCESS").write_text("")
        return folder
    if kind == "csv":
        pacsv.write_csv(table, folder / "listing.csv")
        return folder / "listing.csv"
    path = folder / "listing.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    return path


def build(source, out, *options) -> object:
    return runner.invoke(app, ["pool", "build", str(source), str(out), *options])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_csv_jsonl_and_parquet_listings_become_the_same_manifest(tmp_path, where, request):
    options = ["--uri-column", "object_key", "--uri-prefix", "s3://team-bucket/", "--rows-per-shard", "6"]
    root = str(tmp_path)
    if where == "s3":
        root = request.getfixturevalue("s3_bucket")
    manifests = {}
    for kind in ("parquet", "csv", "json"):
        source = write_listing(TEAM, kind, tmp_path / kind)
        if where == "s3":  # the listing and the manifest both in the bucket
            for path in sorted(p for p in (tmp_path / kind).rglob("*") if p.is_file()):
                storage.write_bytes(f"{root}/{kind}/{path.relative_to(tmp_path / kind)}", path.read_bytes())
            source = f"{root}/{kind}" + ("" if kind == "parquet" else f"/{source.name}")
        out = f"{root}/manifest-{kind}"
        done = build(source, out, *options)
        assert done.exit_code == 0, done.output
        assert "wrote 3 shard(s)" in done.output
        manifests[kind] = read_manifest(out)
    first = manifests["parquet"]
    assert first.column("uri").to_pylist() == [f"s3://team-bucket/{k}" for k in KEYS]
    assert first.column("image_id").to_pylist() == [k.removesuffix(".jpg") for k in KEYS]  # stable: from the key
    assert first.column("width").null_count == first.num_rows  # no sizes: left empty, not read at build time
    for kind in ("csv", "json"):
        assert manifests[kind].equals(first), kind


def test_ids_sizes_and_defaults_from_the_listings_own_columns(tmp_path):
    table = pa.table(
        {
            "uri": ["s3://b/x/1.png", "/data/y/2.jpg", "file:///data/z/3.JPEG"],
            "image_id": ["007", "008", "009"],
            "width": [640, 800, 1024],
            "height": [480, 600, 768],
        }
    )
    source = write_listing(table, "csv", tmp_path / "in")
    done = build(source, tmp_path / "out", "--id-prefix", "week2/")
    assert done.exit_code == 0, done.output
    manifest = read_manifest(str(tmp_path / "out")).to_pydict()
    assert manifest["image_id"] == ["week2/007", "week2/008", "week2/009"]  # CSV ids stay text: zeros kept
    assert manifest["width"] == [640, 800, 1024] and manifest["height"] == [480, 600, 768]
    # Derived ids: the same URI gives the same id whatever else the listing holds, scheme and suffix dropped.
    assert derived_ids(table.column("uri").combine_chunks(), "").to_pylist() == ["b/x/1", "/data/y/2", "/data/z/3"]


BAD = {
    "duplicate ids": (
        {"uri": ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg", "/d/e.jpg"], "image_id": ["1", "1", "2", "3"]},
        ["1 repeated image ids", "'1' in listing.csv row 1, listing.csv row 2"],
    ),
    "duplicate uris": (
        {"uri": ["/d/a.jpg", "/d/b.jpg", "/d/a.jpg"], "image_id": ["1", "2", "3"]},
        ["1 repeated URIs", "'/d/a.jpg' in listing.csv row 1, listing.csv row 3"],
    ),
    "empty uris and bad schemes": (
        {"uri": ["/d/a.jpg", None, "", "gs://b/c.jpg", "images/d.jpg", "https://h/e.jpg"], "n": list(range(6))},
        ["2 rows with an empty URI: listing.csv row 2; listing.csv row 3", "3 URIs that are not", "row 4 ('gs://b/c"],
    ),
    "missing column": (
        {"path": ["/d/a.jpg"]},
        ["no column 'uri' for --uri-column (its columns: path)", "--uri-column key --uri-prefix"],
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_listing_is_refused_naming_rows_and_nothing_is_written(tmp_path, case):
    columns, expected = BAD[case]
    source = write_listing(pa.table(columns), "csv", tmp_path / "in")
    out = tmp_path / "out"
    done = build(source, out)
    assert done.exit_code == 1
    for text in expected:
        assert text in done.output, done.output
    assert not out.exists()  # nothing written, not even the build record


def test_long_lists_of_bad_rows_are_counted(tmp_path):
    source = write_listing(pa.table({"uri": [f"relative/{n}.jpg" for n in range(25)]}), "csv", tmp_path / "in")
    with pytest.raises(ListingError) as error:
        read_listing(str(source))
    message = str(error.value)
    assert "25 URIs that are not" in message and "row 10 ('relative/9.jpg')" in message
    assert "row 11" not in message and "… and 15 more" in message


def test_shards_a_team_wrote_in_our_names_are_a_listing_and_the_refusal_says_both_fixes(tmp_path):
    team = tmp_path / "team-manifest"
    write_manifest_table(
        pa.table({"image_id": ["a", "b"], "uri": ["/d/a.jpg", "/d/b.jpg"], "width": [4, 5], "height": [6, 7]}),
        str(team),
        rows_per_shard=1,
        marker=False,
    )
    from almdn_ray.data.manifest import unfinished_build

    with pytest.raises(ValueError) as error:
        read_manifest(str(team))
    assert str(error.value) == unfinished_build(str(team))
    assert "run the same command again" in str(error.value) and f"pool build {team} OUT" in str(error.value)
    done = build(team, tmp_path / "sealed")
    assert done.exit_code == 0, done.output
    assert read_manifest(str(tmp_path / "sealed")).to_pydict()["width"] == [4, 5]


def test_an_interrupted_build_resumes_and_refuses_other_options(tmp_path):
    source = write_listing(TEAM, "parquet", tmp_path / "in")
    out = tmp_path / "out"
    options = ["--uri-column", "object_key", "--uri-prefix", "s3://team-bucket/", "--rows-per-shard", "4"]
    assert build(source, out, *options).exit_code == 0
    complete = read_manifest(str(out))
    # As if stopped after the second shard: the marker and the last shards gone.
    (out / MARKER).unlink()
    for name in ("manifest-00002.parquet", "manifest-00003.parquet"):
        (out / name).unlink()
    kept = (out / "manifest-00000.parquet").stat().st_mtime_ns
    refused = build(source, out, *options[:-1], "5")
    assert refused.exit_code == 1 and "another listing or other options" in refused.output
    done = build(source, out, *options)
    assert done.exit_code == 0, done.output
    assert (out / "manifest-00000.parquet").stat().st_mtime_ns == kept  # written shards are kept
    assert read_manifest(str(out)).equals(complete)
    # A folder an unfinished `pool build` left is not mistaken for a team's listing.
    (out / MARKER).unlink()
    again = build(out, tmp_path / "elsewhere")
    assert again.exit_code == 1 and "did not finish" in again.output


def test_a_listing_given_to_run_says_how_to_make_it_a_manifest(tmp_path):
    source = write_listing(TEAM, "parquet", tmp_path / "in")
    from almdn_ray.data.validate import read_dataset

    with pytest.raises(ValueError, match=r"is a listing of images .* `almdn-ray pool build"):
        read_dataset(str(source))


def test_a_pool_without_sizes_has_them_read_from_the_images_for_export_import_and_training(tmp_path):
    """A human-mode run on a manifest built from a listing with no sizes: the export carries each image's real
    size, the import checks boxes against it, and the records training gets have it."""
    config = DemoConfig(image_size=48, digit_size=(16, 30))
    paths = build_demo(tmp_path / "demo", pool_images=12, test_images=3, config=config)
    truth = read_coco(str(paths["pool"]))
    sizes = {}
    for n, r in enumerate(truth.records):  # the demo's images, made of different sizes (the listing says none)
        from PIL import Image

        with Image.open(r.uri) as image:
            resized = image.resize((48 + 4 * n, 40 + 2 * n))
        resized.save(r.uri)
        sizes[r.image_id] = resized.size
    by_uri = {r.uri: r for r in truth.records}
    listing = write_listing(pa.table({"uri": list(by_uri)}), "jsonl", tmp_path / "listing")
    assert build(listing, tmp_path / "manifest").exit_code == 0
    manifest = read_manifest(str(tmp_path / "manifest"))
    ids = dict(zip(manifest.column("uri").to_pylist(), manifest.column("image_id").to_pylist()))
    job = spec_from_dict(
        {
            "storage": {"uri": str(tmp_path / "run")},
            "dataset": {
                "train": str(tmp_path / "manifest"),
                "test": str(paths["test"]),
                "classes": list(truth.classes),
            },
            "acquisition": {"initial_labeled": 5, "budget": 3, "cycles": 1},
            "labels": {"mode": "human"},
        }
    )
    recorder = Recorder()
    state = Driver(job, recorder.functions()).run()
    assert state.status == "awaiting_labels"
    driver = Driver(job, recorder.functions())
    exported = storage.read_json(export_labels(str(tmp_path / "run"), driver.pool)["labels"])
    uri_of = {v: k for k, v in ids.items()}
    for image in exported["images"]:
        truth_id = by_uri[uri_of[image["almdn_image_id"]]].image_id
        assert (image["width"], image["height"]) == sizes[truth_id]
    # Label them with the true boxes, scaled to the resized images, under the pool's ids.
    labelled = []
    for image in exported["images"]:
        record = by_uri[uri_of[image["almdn_image_id"]]]
        w, h = sizes[record.image_id]
        scale = np.array([w / record.width, h / record.height] * 2, np.float32)
        labelled.append(
            type(record)(
                image["almdn_image_id"], record.uri, w, h, record.boxes * scale, record.labels, record.difficult
            )
        )
    (tmp_path / "labels.json").write_text(json.dumps(to_coco_dict(Dataset(labelled, truth.classes))))
    import_labels(str(tmp_path / "run"), str(tmp_path / "labels.json"), driver.pool)
    Driver(job, recorder.functions()).run()
    trained = {r.image_id: r for r in recorder.train_records[0]}
    assert sorted(trained) == sorted(r.image_id for r in labelled)
    for record in labelled:
        got = trained[record.image_id]
        assert (got.width, got.height) == (record.width, record.height)
        assert np.allclose(got.boxes, record.boxes, atol=0.5)
    assert storage.exists(RunLayout(str(tmp_path / "run")).pool)


def test_data_validate_reads_a_listing_as_pool_build_would(tmp_path):
    good = write_listing(
        pa.table({"uri": ["/d/a.jpg", "/d/b.jpg"], "width": [3, None], "height": [4, None]}), "csv", tmp_path / "good"
    )
    done = runner.invoke(app, ["data", "validate", str(good)])
    assert done.exit_code == 0, done.output
    assert "images: 2, with sizes: 1" in done.output and f"pool build {good} OUT" in done.output
    bad = write_listing(pa.table({"uri": ["/d/a.jpg", "/d/a.jpg"]}), "jsonl", tmp_path / "bad")
    done = runner.invoke(app, ["data", "validate", str(bad)])
    assert done.exit_code == 1 and "'/d/a' in listing.jsonl row 1, listing.jsonl row 2" in done.output


def test_spaces_around_uris_are_refused_and_spark_temporaries_are_not_read(tmp_path):
    source = write_listing(pa.table({"uri": ["/d/a.jpg", "/d/b.jpg ", "/d/c.jpg"]}), "parquet", tmp_path / "lake")
    (tmp_path / "lake" / "_temporary" / "0").mkdir(parents=True)  # a failed attempt's leftovers: not data
    pq.write_table(pa.table({"uri": ["/d/a.jpg"]}), tmp_path / "lake" / "_temporary" / "0" / "part-00000.parquet")
    with pytest.raises(ListingError) as error:
        read_listing(str(source))
    message = str(error.value)
    assert "1 URIs with spaces before or after them (trim them): part-00000-3f2a.c000.snappy.parquet row 2" in message
    assert "repeated" not in message  # the _temporary copy of /d/a.jpg was not read


def test_a_resumed_build_of_a_listing_that_changed_writes_its_rows_anew(tmp_path):
    source = write_listing(TEAM, "csv", tmp_path / "in")
    out = tmp_path / "out"
    options = ["--uri-column", "object_key", "--uri-prefix", "s3://team-bucket/", "--rows-per-shard", "7"]
    assert build(source, out, *options).exit_code == 0
    (out / MARKER).unlink()  # as if stopped before sealing; then the team's job rewrites the listing, same size
    write_listing(TEAM.take(list(reversed(range(TEAM.num_rows)))), "csv", tmp_path / "in")
    assert build(source, out, *options).exit_code == 0
    assert build(source, tmp_path / "fresh", *options).exit_code == 0
    assert read_manifest(str(out)).equals(read_manifest(str(tmp_path / "fresh")))
    assert read_manifest(str(out)).column("image_id").to_pylist()[0] == KEYS[-1].removesuffix(".jpg")


def test_a_folder_with_images_at_its_top_is_an_image_folder(tmp_path):
    from almdn_ray.data.validate import detect_format

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    (tmp_path / "imgs" / "index.csv").write_text("uri\n/d/a.jpg\n")
    assert detect_format(str(tmp_path / "imgs")) == "images"
    assert detect_format(str(write_listing(TEAM, "parquet", tmp_path / "lake"))) == "listing"
