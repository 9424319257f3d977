import json

import numpy as np
import pytest

from almdn_ray import storage
from almdn_ray.data import DatasetError, read_coco, to_coco_dict
from almdn_ray.data.images import read_image
from tests.conftest import encode_image, random_image


def coco(**overrides):
    content = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 11, "file_name": "sub/b.png", "width": 64, "height": 48},
            {"id": 12, "file_name": "c.png", "width": 64, "height": 48},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 12, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 12, "bbox": [1, 2, 10, 20], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [50, 40, 30, 30], "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [0, 0, 64, 48], "iscrowd": 1},
        ],
    }
    content.update(overrides)
    return content


def test_categories_become_contiguous_labels_and_map_back(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco()))
    dataset = read_coco(str(path))
    assert dataset.classes == ("dog", "cat", "bird") and dataset.category_ids == (3, 7, 12)
    a, b, c = dataset.records
    assert a.labels.tolist() == [3, 1] and [dataset.category_ids[i - 1] for i in a.labels] == [12, 3]
    np.testing.assert_array_equal(a.boxes, [[1, 2, 11, 22], [50, 40, 64, 48]])  # the second box is clipped
    assert dataset.problems.counts["boxes clipped to the image"] == 1
    assert b.difficult.tolist() == [True]  # iscrowd: kept, excluded from training, ignored in evaluation
    assert b.uri == str(tmp_path / "sub" / "b.png")
    assert len(c.labels) == 0  # images without annotations are kept
    back = to_coco_dict(dataset)
    assert [ann["category_id"] for ann in back["annotations"]] == [12, 3, 7]
    assert back["annotations"][1]["bbox"] == [50.0, 40.0, 14.0, 8.0]


def test_every_bad_input_is_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DatasetError, match=r"bad.json: malformed JSON at line 2, column 12"):
        read_coco(str(path))
    broken = coco(
        annotations=[
            {"id": 5, "image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1]},
            {"id": 6, "image_id": 10, "category_id": 4, "bbox": [0, 0, 1, 1]},
            {"id": 7, "image_id": 10, "category_id": 3, "bbox": [0, 0]},
        ]
    )
    broken["images"].append({"id": 10, "file_name": "again.png", "width": 1, "height": 1})
    path.write_text(json.dumps(broken))
    with pytest.raises(DatasetError) as caught:
        read_coco(str(path))
    text = str(caught.value)
    assert "images[3] repeats image id 10" in text
    assert "annotations[0] (id 5) refers to unknown image id 99" in text
    assert "annotations[1] (id 6): unknown category id 4; known: [3, 7, 12]" in text
    assert "annotations[2] (id 7): bbox must be [x, y, width, height]" in text
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="missing list 'annotations'"):
        read_coco(str(path))
    path.write_text(json.dumps(coco(images=[], annotations=[])))
    with pytest.raises(DatasetError, match="no images; the split is empty"):
        read_coco(str(path))


def test_reads_annotations_and_images_from_s3(s3_bucket):
    root = f"{s3_bucket}/coco"
    storage.write_bytes(f"{root}/instances.json", json.dumps(coco()).encode())
    pixels = random_image(64, 48)
    storage.write_bytes(f"{root}/a.png", encode_image(pixels))
    dataset = read_coco(f"{root}/instances.json")
    assert dataset.records[0].uri == f"{root}/a.png"
    np.testing.assert_array_equal(read_image(dataset.records[0].uri).permute(1, 2, 0).numpy(), pixels)
