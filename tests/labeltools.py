"""Labelling-tool exports written in each tool's conventions (see ../shared/labeltool-samples/README.md).

Each writer takes the records to export (their boxes are "what the labeller drew") and the class names, and
writes a file as that tool writes it: its renaming of images, its id bases, its extra keys, its coordinates.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import zipfile
from pathlib import Path


def _hex(text: str, n: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def _base(uri: str) -> str:
    return posixpath.basename(uri.replace("\\", "/"))


def labelstudio_coco(records, classes, out: Path) -> Path:
    """Label Studio's "COCO" export: ``images/<8 hex>-<name>``, ids and category ids from 0, ``ignore: 0``,
    empty segmentations, boxes converted from percent, no licenses, ``info`` last, slashes escaped."""
    coco = {"images": [], "categories": [], "annotations": []}
    for n, r in enumerate(records):
        coco["images"].append(
            {"width": r.width, "height": r.height, "id": n, "file_name": f"images/{_hex(r.uri, 8)}-{_base(r.uri)}"}
        )
        for box, label in zip(r.boxes.tolist(), r.labels.tolist()):
            x1, y1, x2, y2 = box
            x, y, w, h = (
                100 * x1 / r.width,
                100 * y1 / r.height,
                100 * (x2 - x1) / r.width,
                100 * (y2 - y1) / r.height,
            )
            bbox = [x * r.width / 100, y * r.height / 100, w * r.width / 100, h * r.height / 100]
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]),
                    "image_id": n,
                    "category_id": label - 1,
                    "segmentation": [],
                    "bbox": bbox,
                    "ignore": 0,
                    "iscrowd": 0,
                    "area": bbox[2] * bbox[3],
                }
            )
    coco["categories"] = [{"id": i, "name": name} for i, name in enumerate(classes)]
    coco["info"] = {"year": 2023, "version": "1.0", "description": "", "contributor": "Label Studio", "url": "",
                    "date_created": "2023-08-02 22:30:12.284530"}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / "result.json"
    path.write_text(json.dumps(coco).replace("/", "\\/"))
    return path


def _region(r, box, name, n, *, rotation=0.0):
    x1, y1, x2, y2 = box
    return {
        "original_width": r.width,
        "original_height": r.height,
        "image_rotation": 0,
        "value": {
            "x": 100 * x1 / r.width,
            "y": 100 * y1 / r.height,
            "width": 100 * (x2 - x1) / r.width,
            "height": 100 * (y2 - y1) / r.height,
            "rotation": rotation,
            "rectanglelabels": [name],
        },
        "id": _hex(f"{r.image_id}{n}", 10),
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def labelstudio_json(tasks_exported: list, records, classes, out: Path) -> Path:
    """Label Studio's "JSON" export of the tasks we exported: ``data`` kept (Label Studio keeps task data;
    images were uploaded, so ``data.image`` is ``/data/upload/<project>/<hash>-<name>``), percent
    coordinates with ``original_width``, and several annotators per task: on the first task an earlier
    annotator's boxes are off and the later one is right; on the second a later annotation was cancelled;
    on the third an older ground-truth annotation wins over a later, wrong one."""
    by_id = {r.image_id: r for r in records}
    tasks = []
    for n, exported in enumerate(tasks_exported):
        r = by_id[exported["data"]["almdn_image_id"]]
        data = dict(exported["data"], image=f"/data/upload/7/{_hex(r.uri, 8)}-{_base(r.uri)}")
        right = [_region(r, b, classes[c - 1], i) for i, (b, c) in enumerate(zip(r.boxes.tolist(), r.labels.tolist()))]
        wrong = [_region(r, [1, 1, 5, 5], classes[0], 99)]

        def annotation(aid, result, updated, *, cancelled=False, truth=False, by=1, n=n):
            return {"id": aid, "completed_by": by, "result": result, "was_cancelled": cancelled,
                    "ground_truth": truth, "created_at": "2022-12-27T13:36:25.747398Z", "updated_at": updated,
                    "lead_time": 12.5, "prediction": {}, "result_count": 0, "task": n + 1, "project": 7,
                    "parent_prediction": None, "parent_annotation": None}  # fmt: skip

        annotations = [annotation(10 * n + 1, right, "2022-12-27T21:05:03.127871Z")]
        if n == 0:
            annotations.insert(0, annotation(10 * n + 2, wrong, "2022-12-27T21:04:40.495704Z", by=2))
        elif n == 1:
            annotations.append(annotation(10 * n + 2, wrong, "2022-12-28T09:00:00.000000Z", cancelled=True, by=2))
        elif n == 2:
            annotations = [
                annotation(10 * n + 1, right, "2022-12-26T10:00:00.000000Z", truth=True),
                annotation(10 * n + 2, wrong, "2022-12-28T09:00:00.000000Z", by=2),
            ]
        tasks.append(
            {
                "id": n + 1,
                "annotations": annotations,
                "drafts": [],
                "predictions": [],
                "data": data,
                "meta": {},
                "created_at": "2022-12-27T12:06:58.502299Z",
                "updated_at": "2022-12-27T21:05:03.168883Z",
                "inner_id": n + 1,
                "total_annotations": len(annotations),
                "cancelled_annotations": 0,
                "total_predictions": 0,
                "comment_count": 0,
                "unresolved_comment_count": 0,
                "last_comment_updated_at": None,
                "project": 7,
                "updated_by": 1,
                "comment_authors": [],
            }  # fmt: skip
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "project-7-at-2022-12-27-21-05.json"
    path.write_text(json.dumps(tasks, indent=1))
    return path


def cvat_coco(records, classes, out: Path) -> Path:
    """CVAT's "COCO 1.0" export: the uploaded file's name, ids from 1, empty licence/info defaults, every
    project class (most unused here), ``attributes`` on each annotation, float noise in ``area``."""
    coco = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "url": "", "version": "", "year": ""},
        "categories": [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(classes)],
        "images": [],
        "annotations": [],
    }
    for n, r in enumerate(records, start=1):
        coco["images"].append({"id": n, "width": r.width, "height": r.height, "file_name": _base(r.uri), "license": 0,
                               "flickr_url": "", "coco_url": "", "date_captured": 0})  # fmt: skip
        for box, label in zip(r.boxes.tolist(), r.labels.tolist()):
            x1, y1, x2, y2 = box
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": n,
                    "category_id": label,
                    "segmentation": [],
                    "area": (x2 - x1) * (y2 - y1) + 1e-10,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                    "attributes": {"occluded": False, "rotation": 0.0},
                }  # fmt: skip
            )
    folder = out / "annotations"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "instances_default.json"
    path.write_text(json.dumps(coco))
    return path


def cvat_voc(records, classes, out: Path, *, as_zip: bool = True) -> Path:
    """CVAT's "Pascal VOC 1.1" export (a zip): ``<filename>`` the uploaded name, empty ``<depth>``, float
    continuous coordinates, ``<occluded>`` and a rotation attribute per object, split ``default``, classes
    in ``labelmap.txt`` with an extra ``background``."""
    files = {}
    for r in records:
        objects = "".join(
            f"""
  <object>
    <name>{classes[c - 1]}</name>
    <truncated>0</truncated>
    <occluded>0</occluded>
    <difficult>0</difficult>
    <bndbox>
      <xmin>{b[0]!r}</xmin>
      <ymin>{b[1]!r}</ymin>
      <xmax>{b[2]!r}</xmax>
      <ymax>{b[3]!r}</ymax>
    </bndbox>
    <attributes>
      <attribute>
        <name>rotation</name>
        <value>0.0</value>
      </attribute>
    </attributes>
  </object>"""
            for b, c in zip(r.boxes.tolist(), r.labels.tolist())
        )
        stem = posixpath.splitext(_base(r.uri))[0]
        files[f"Annotations/{stem}.xml"] = f"""<annotation>
  <folder></folder>
  <filename>{_base(r.uri)}</filename>
  <source>
    <database>Unknown</database>
    <annotation>Unknown</annotation>
    <image>Unknown</image>
  </source>
  <size>
    <width>{r.width}</width>
    <height>{r.height}</height>
    <depth></depth>
  </size>
  <segmented>0</segmented>{objects}
</annotation>
"""
    files["ImageSets/Main/default.txt"] = "".join(posixpath.splitext(_base(r.uri))[0] + "\n" for r in records)
    palette = ["128,0,0", "0,128,0", "128,128,0", "0,0,128", "128,0,128", "0,128,128"]
    files["labelmap.txt"] = "# label:color_rgb:parts:actions\nbackground:0,0,0::\n" + "".join(
        f"{name}:{palette[i % len(palette)]}::\n" for i, name in enumerate(classes)
    )
    out.mkdir(parents=True, exist_ok=True)
    if as_zip:
        path = out / "task_7-2022_03_20_16_00_00-pascal voc 1.1.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for name, text in files.items():
                archive.writestr(name, text.encode("utf-8"))
        return path
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text, encoding="utf-8")
    return out


def roboflow_coco(records, classes, out: Path, *, size: int = 640) -> Path:
    """Roboflow's "COCO" export: images resized to ``size`` x ``size`` (boxes with them), renamed
    ``<stem>_<ext>.rf.<32 hex>.jpg`` (the original name only in ``extra.name``), a never-used dataset-level
    category 0 that is the supercategory of the real classes 1..N, ids from 0, ISO ``date_captured``."""
    coco = {
        "info": {
            "year": "2025",
            "version": "1",
            "description": "Exported from roboflow.com",
            "contributor": "",
            "url": "https://public.roboflow.com/object-detection/undefined",
            "date_created": "2025-01-10T11:34:30+00:00",
        },  # fmt: skip
        "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}],
        "categories": [{"id": 0, "name": "digits", "supercategory": "none"}]
        + [{"id": i + 1, "name": name, "supercategory": "digits"} for i, name in enumerate(classes)],
        "images": [],
        "annotations": [],
    }
    for n, r in enumerate(records):
        stem, ext = posixpath.splitext(_base(r.uri))
        coco["images"].append({"id": n, "license": 1, "file_name": f"{stem}_{ext[1:]}.rf.{_hex(r.uri, 32)}.jpg",
                               "height": size, "width": size, "date_captured": "2025-01-10T11:34:30+00:00",
                               "extra": {"name": _base(r.uri)}})  # fmt: skip
        sx, sy = size / r.width, size / r.height
        for box, label in zip(r.boxes.tolist(), r.labels.tolist()):
            x1, y1, x2, y2 = box
            bbox = [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy]
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": n, "category_id": label,
                                        "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})  # fmt: skip
    folder = out / "test"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "_annotations.coco.json"
    path.write_text(json.dumps(coco))
    return path
