import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from almdn_ray import storage
from almdn_ray.cli import app
from almdn_ray.data.manifest import read_manifest, rows_from_images, write_manifest
from tests.conftest import encode_image, random_image

runner = CliRunner()


def test_shards_by_row_count_and_reads_back(tmp_path):
    rows = [(f"img{i:02d}", f"/data/img{i:02d}.png", 10 + i, 20) for i in range(10)]
    shards = write_manifest(rows, str(tmp_path / "pool"), rows_per_shard=4)
    assert [s.rsplit("/", 1)[-1] for s in shards] == [
        "manifest-00000.parquet",
        "manifest-00001.parquet",
        "manifest-00002.parquet",
    ]
    assert [pq.read_metadata(s).num_rows for s in shards] == [4, 4, 2]
    table = read_manifest(str(tmp_path / "pool"))
    assert table.column_names == ["image_id", "uri", "width", "height"]
    assert table.to_pylist()[3] == {"image_id": "img03", "uri": "/data/img03.png", "width": 13, "height": 20}


def test_duplicates_and_empty_pools_are_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate image id 'a'"):
        write_manifest([("a", "x", 1, 1), ("a", "y", 1, 1)], str(tmp_path / "p"))
    with pytest.raises(ValueError, match="no images for the pool manifest"):
        write_manifest([], str(tmp_path / "q"))
    with pytest.raises(FileNotFoundError, match="no manifest-"):
        read_manifest(str(tmp_path))


def test_image_folder_on_s3_with_a_corrupt_file(s3_bucket):
    folder = f"{s3_bucket}/raw"
    storage.write_bytes(f"{folder}/a.png", encode_image(random_image(30, 20)))
    storage.write_bytes(f"{folder}/deep/b.jpg", encode_image(random_image(16, 12), "JPEG"))
    storage.write_bytes(f"{folder}/broken.png", b"\x89PNG\r\n\x1a\nnot really")
    storage.write_bytes(f"{folder}/readme.txt", b"not an image")
    skipped = []
    rows = list(rows_from_images(folder, skipped=skipped))
    assert rows == [("a", f"{folder}/a.png", 30, 20), ("deep/b", f"{folder}/deep/b.jpg", 16, 12)]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    result = runner.invoke(app, ["pool", "build", folder, f"{s3_bucket}/pool", "--pattern", "*.jpg"])
    assert result.exit_code == 0, result.output
    assert read_manifest(f"{s3_bucket}/pool").column("image_id").to_pylist() == ["deep/b"]


def test_pool_build_from_a_coco_split(tmp_path):
    (tmp_path / "split.json").write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 6} for i in range(1, 6)],
                "annotations": [],
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    result = runner.invoke(
        app, ["pool", "build", str(tmp_path / "split.json"), str(tmp_path / "pool"), "--rows-per-shard", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 3 shard(s)" in result.output
    table = read_manifest(str(tmp_path / "pool"))
    assert table.column("image_id").to_pylist() == ["1", "2", "3", "4", "5"]
    assert table.column("uri").to_pylist()[0] == str(tmp_path / "1.png")
    missing = runner.invoke(app, ["pool", "build", str(tmp_path / "nope"), str(tmp_path / "pool2")])
    assert missing.exit_code == 1 and "nope does not exist" in missing.output


def test_a_null_or_empty_image_id_is_refused_with_its_row(tmp_path):
    import pyarrow as pa

    from almdn_ray.data.manifest import check_unique_ids, write_manifest_table

    with pytest.raises(ValueError, match=r"new.json: 2 row\(s\) have no image_id \(null or empty\): 1, 3;"):
        check_unique_ids(pa.chunked_array([["a", None], ["b", ""]]), "new.json")
    table = pa.table({"image_id": ["a", None], "uri": ["a.png", "b.png"], "width": [1, 1], "height": [1, 1]})
    with pytest.raises(ValueError, match=r"1 row\(s\) have no image_id \(null or empty\): 1;"):
        write_manifest_table(table, str(tmp_path / "pool"))


def test_pool_build_puts_an_id_prefix_before_every_id_and_a_resume_keeps_it(tmp_path):
    from almdn_ray.data.manifest import build_image_manifest, plan_image_build

    for name in ("a.png", "sub/b.png"):
        (tmp_path / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / name).write_bytes(encode_image(random_image(8, 6)))
    result = runner.invoke(app, ["pool", "build", str(tmp_path / "imgs"), str(tmp_path / "p"), "--id-prefix", "cam2/"])
    assert result.exit_code == 0, result.output
    assert read_manifest(str(tmp_path / "p")).column("image_id").to_pylist() == ["cam2/a", "cam2/sub/b"]
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 6}], "annotations": [], "categories": []}
    (tmp_path / "imgs" / "split.json").write_text(json.dumps(coco))
    result = runner.invoke(app, ["pool", "build", str(tmp_path / "imgs" / "split.json"), str(tmp_path / "q"),
                                 "--id-prefix", "w1/"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_manifest(str(tmp_path / "q")).column("image_id").to_pylist() == ["w1/1"]
    plan_image_build(str(tmp_path / "imgs"), str(tmp_path / "r"))  # a build started without a prefix
    with pytest.raises(ValueError, match=r"was started with --id-prefix ''; give the same"):
        build_image_manifest(str(tmp_path / "imgs"), str(tmp_path / "r"), id_prefix="cam2/")
