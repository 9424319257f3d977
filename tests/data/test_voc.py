from pathlib import Path

import numpy as np
import pytest

from almdn_ray.data import DatasetError, read_voc
from tests.conftest import encode_image, random_image


def annotation(width=100, height=80, objects=(("dog", (10, 20, 50, 60), 0),)) -> str:
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (x1, y1, x2, y2), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def make_year(root: Path, year: str, files: dict[str, str], split: str = "trainval", ids=None) -> Path:
    folder = root / year
    (folder / "Annotations").mkdir(parents=True)
    (folder / "JPEGImages").mkdir()
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    for name, xml in files.items():
        (folder / "Annotations" / f"{name}.xml").write_text(xml)
        (folder / "JPEGImages" / f"{name}.jpg").write_bytes(encode_image(random_image(100, 80), "JPEG"))
    (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids if ids is not None else files))
    return folder


def test_reads_07_and_12_side_by_side(tmp_path):
    make_year(
        tmp_path,
        "VOC2007",
        {"000005": annotation(objects=[("dog", (10, 20, 50, 60), 0), ("person", (1, 1, 100, 80), 1)])},
    )
    make_year(
        tmp_path,
        "VOC2012",
        {"2008_000001": annotation(objects=[("cat", (5, 5, 9, 9), 0)]), "2008_000002": annotation(objects=[])},
    )
    dataset = read_voc(str(tmp_path))
    assert [r.image_id for r in dataset.records] == ["VOC2007/000005", "VOC2012/2008_000001", "VOC2012/2008_000002"]
    first = dataset.records[0]
    np.testing.assert_array_equal(first.boxes, [[9, 19, 50, 60], [0, 0, 100, 80]])  # 1-based -> continuous
    assert [dataset.classes[i - 1] for i in first.labels] == ["dog", "person"]
    assert first.difficult.tolist() == [False, True]
    assert first.uri.endswith("VOC2007/JPEGImages/000005.jpg") and (first.width, first.height) == (100, 80)
    assert len(dataset.records[2].labels) == 0  # an image without objects is kept
    only_07 = read_voc(str(tmp_path), years=["VOC2007"])
    assert len(only_07.records) == 1
    single = read_voc(str(tmp_path / "VOC2012"))
    assert [r.image_id for r in single.records] == ["2008_000001", "2008_000002"]


def test_custom_class_list(tmp_path):
    make_year(tmp_path, "VOC2007", {"a": annotation(objects=[("widget", (1, 1, 10, 10), 0)])})
    dataset = read_voc(str(tmp_path), classes=["gadget", "widget"])
    assert dataset.records[0].labels.tolist() == [2] and dataset.num_classes == 3


def test_boxes_outside_are_clipped_and_empty_ones_dropped_with_counts(tmp_path):
    make_year(
        tmp_path,
        "VOC2007",
        {
            "a": annotation(
                width=100,
                height=80,
                objects=[("dog", (90, 70, 130, 95), 0), ("dog", (150, 10, 160, 20), 0), ("cat", (10, 10, 20, 20), 0)],
            )
        },
    )
    dataset = read_voc(str(tmp_path))
    np.testing.assert_array_equal(dataset.records[0].boxes, [[89, 69, 100, 80], [9, 9, 20, 20]])
    assert dataset.problems.counts["boxes clipped to the image"] == 2
    assert dataset.problems.counts["empty boxes dropped"] == 1
    assert "a.xml: box 1" in dataset.problems.examples("empty boxes dropped")[0]


def test_every_bad_input_is_named(tmp_path):
    make_year(
        tmp_path,
        "VOC2007",
        {
            "good": annotation(),
            "broken": "<annotation><size><width>10</width></size>\n<object><name>dog</oops></annotation>",
            "alien": annotation(objects=[("unicorn", (1, 1, 5, 5), 0)]),
            "nosize": "<annotation><object><name>dog</name></object></annotation>",
        },
        ids=["good", "broken", "alien", "nosize", "good", "missing"],
    )
    with pytest.raises(DatasetError) as caught:
        read_voc(str(tmp_path))
    text = str(caught.value)
    assert "broken.xml: malformed XML at line 2, column" in text
    assert "alien.xml object 0: unknown class 'unicorn'; known classes: ['aeroplane'," in text
    assert "nosize.xml: missing <size/width>" in text
    assert "image id 'good' is listed twice" in text
    assert "missing.xml: annotation file is missing" in text
    assert len(caught.value.problems.errors) == 6  # nosize lacks width and height


def test_empty_or_missing_split(tmp_path):
    make_year(tmp_path, "VOC2007", {}, ids=[])
    with pytest.raises(DatasetError, match="the split is empty"):
        read_voc(str(tmp_path))
    with pytest.raises(DatasetError, match=r"ImageSets/Main/test.txt: split file is missing"):
        read_voc(str(tmp_path), split="test")
    with pytest.raises(FileNotFoundError, match="neither Annotations/ nor VOC20xx/"):
        read_voc(str(tmp_path / "VOC2007" / "JPEGImages"))
