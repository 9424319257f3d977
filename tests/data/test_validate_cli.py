import json

from typer.testing import CliRunner

from almdn_ray.cli import app
from tests.conftest import encode_image, random_image
from tests.data.test_voc import annotation, make_year

runner = CliRunner()


def write_coco_folder(folder, *, corrupt=False, box=(1, 2, 10, 10)):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").write_bytes(encode_image(random_image(32, 24)))
    data = encode_image(random_image(32, 24))
    (folder / "b.png").write_bytes(data[:60] + b"garbage" * 8 + data[116:] if corrupt else data)
    (folder / "ann.json").write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "file_name": "a.png", "width": 32, "height": 24},
                    {"id": 2, "file_name": "b.png", "width": 32, "height": 24},
                ],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": list(box)}],
                "categories": [{"id": 5, "name": "cup"}],
            }
        )
    )
    return folder / "ann.json"


def test_summary_of_a_usable_coco_dataset(tmp_path):
    result = runner.invoke(app, ["data", "validate", str(write_coco_folder(tmp_path, box=(20, 20, 30, 10)))])
    assert result.exit_code == 0, result.output
    assert "(coco)" in result.output and "images: 2, classes: 1, boxes: 1" in result.output
    assert "cup: 1" in result.output
    assert "warning: 1 boxes clipped to the image" in result.output and "usable: yes" in result.output


def test_a_corrupt_image_makes_it_unusable_and_is_named(tmp_path):
    result = runner.invoke(app, ["data", "validate", str(write_coco_folder(tmp_path, corrupt=True))])
    assert result.exit_code == 1
    assert "b.png: corrupt PNG" in result.output
    assert "not usable" in result.output


def test_voc_folder_is_detected_and_bad_xml_reported(tmp_path):
    make_year(tmp_path, "VOC2007", {"1": annotation(), "2": "<annotation>"})
    result = runner.invoke(app, ["data", "validate", str(tmp_path)])
    assert result.exit_code == 1
    assert "(voc)" in result.output and "2.xml: malformed XML at line 1" in result.output
    through_year = runner.invoke(
        app, ["data", "validate", str(tmp_path / "VOC2007"), "--split", "trainval", "--no-check-images"]
    )
    assert through_year.exit_code == 1  # the same broken file, read through the year folder


def test_missing_path(tmp_path):
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "nothing does not exist" in result.output
