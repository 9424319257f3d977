"""`data validate` names everything: fallback names, case clashes of classes, counted and truncated lists."""

import json

from typer.testing import CliRunner

from almdn_ray.cli import app
from almdn_ray.data.validate import validate_dataset
from tests.conftest import encode_image, random_image

runner = CliRunner()


def write_coco(folder, names, *, categories=("cup",), boxes=()):
    """A COCO file in ``folder`` naming ``names`` (32x24 images); ``boxes`` are ``(image index, category
    index, [x, y, w, h])``."""
    folder.mkdir(parents=True, exist_ok=True)
    coco = {
        "images": [{"id": i + 1, "file_name": n, "width": 32, "height": 24} for i, n in enumerate(names)],
        "annotations": [
            {"id": n + 1, "image_id": i + 1, "category_id": c + 1, "bbox": list(b)} for n, (i, c, b) in enumerate(boxes)
        ],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(categories)],
    }
    (folder / "ann.json").write_text(json.dumps(coco))
    return str(folder / "ann.json")


def test_windows_paths_and_upload_hashes_fall_back_to_the_basename(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(encode_image(random_image(32, 24)))
    path = write_coco(tmp_path, ["images\\a.png", "images/3f2a9c1d-b.png"], boxes=[(0, 0, (1, 1, 5, 5))])
    report = validate_dataset(path)
    assert report.missing_images == []  # found, not missing ...
    assert [r.uri for r in report.dataset.records] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert not report.usable  # ... but `run` reads the names as written: the file must be fixed first
    result = runner.invoke(app, ["data", "validate", path])
    assert result.exit_code == 1, result.output
    assert "problem: 2 images found by another name" in result.output
    assert "images/a.png: found as a.png" in result.output


def test_missing_images_are_counted_in_one_line_with_the_first_examples(tmp_path):
    path = write_coco(tmp_path, [f"img{n}.jpg" for n in range(8)])
    result = runner.invoke(app, ["data", "validate", path])
    assert result.exit_code == 1
    output = result.output.replace(str(tmp_path), "TMP")
    lines = [line for line in output.splitlines() if "missing" in line]
    assert len(lines) == 1, result.output
    assert "8 images missing, e.g. img0.jpg, img1.jpg, img2.jpg … and 5 more" in lines[0]


def test_classes_differing_in_case_or_space_are_reported_with_how_import_maps_them(tmp_path):
    boxes = [(0, 0, (1, 1, 5, 5)), (0, 1, (1, 1, 5, 5)), (0, 1, (2, 2, 5, 5)), (0, 2, (1, 1, 5, 5))]
    path = write_coco(tmp_path, ["a.png"], categories=("Butterfly", "butterfly ", "moth"), boxes=boxes)
    result = runner.invoke(app, ["data", "validate", "--no-check-images", path])
    assert result.exit_code == 0, result.output
    assert "warning: 1 classes that differ only in case or surrounding space" in result.output
    assert "'Butterfly' (1 boxes), 'butterfly ' (2 boxes) stay 2 classes" in result.output
    assert "`labels import` takes a category by its exact name" in result.output


def test_every_truncated_list_of_warnings_ends_with_how_many_more(tmp_path):
    boxes = [(0, 0, (20, 20, 30, 10))] * 8  # each runs over the 32x24 image and is clipped
    path = write_coco(tmp_path, ["a.png"], boxes=boxes)
    result = runner.invoke(app, ["data", "validate", "--no-check-images", path])
    assert result.exit_code == 0, result.output
    assert "warning: 8 boxes clipped to the image" in result.output
    assert "  … and 3 more" in result.output
