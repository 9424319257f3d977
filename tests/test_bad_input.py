"""Bad input gets a clear error naming the key, file or field (issue 13's list), and files others can read."""

import json
import os
import stat

import pytest

from almdn_ray import storage
from almdn_ray.config import SpecError, spec_from_dict
from almdn_ray.data.coco import read_coco
from almdn_ray.data.records import DatasetError
from almdn_ray.data.voc import read_voc


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"seed": -1}, r"seed must be in \[0, 2\*\*32\), got -1"),
        ({"storage": {"uri": ""}}, "storage.uri is empty"),
        ({"storage": {"uri": "gs://bucket/run"}}, r"gs:// is not supported; use a local path, file:// or s3://"),
        ({"dataset": {"classes": []}}, "dataset.classes is empty"),
        ({"dataset": {"classes": ["a", "b", "a"]}}, r"dataset.classes names \['a'\] more than once"),
    ],
)
def test_bad_job_values_are_refused_by_key(data, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(data)


def _coco(tmp_path, images, annotations=(), categories=({"id": 1, "name": "a"},)):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"images": images, "annotations": list(annotations), "categories": list(categories)}))
    return str(path)


def test_coco_names_outside_the_root_bad_sizes_shared_category_ids_and_string_crowd_flags(tmp_path):
    path = _coco(
        tmp_path,
        [
            {"id": 1, "file_name": "../../etc/passwd", "width": 10, "height": 10},
            {"id": 2, "file_name": "ok.png", "width": "inf", "height": 10},
        ],
        categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}],
    )
    with pytest.raises(DatasetError) as caught:
        read_coco(path)
    text = str(caught.value)
    assert "file_name '../../etc/passwd' leaves the image root" in text
    assert "width/height 'inf'x10 must be positive numbers" in text
    assert "categories 'a' and 'b' share id 1" in text
    images = [{"id": 1, "file_name": "ok.png", "width": 10, "height": 10}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": "0"},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 1},
    ]
    record = read_coco(_coco(tmp_path, images, annotations)).records[0]
    assert record.difficult.tolist() == [False, True]  # "0" is not crowd


def test_voc_with_an_infinite_size_names_the_file(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "trainval.txt").write_text("a\n")
    xml = "<annotation><size><width>inf</width><height>10</height></size></annotation>"
    (tmp_path / "Annotations" / "a.xml").write_text(xml)
    with pytest.raises(DatasetError, match=r"a.xml: <size> 'inf' x '10' is not a positive image size"):
        read_voc(str(tmp_path))


def test_files_are_written_with_the_umask_mode_and_synced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    storage.write_json(str(tmp_path / "state.json"), {"a": 1})
    mode = stat.S_IMODE((tmp_path / "state.json").stat().st_mode)
    assert mode == 0o666 & ~storage._UMASK and mode & 0o044  # group and others can read it (umask 022)
    assert len(synced) == 2  # the file, then its folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
