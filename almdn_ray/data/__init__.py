"""Datasets into one record form, augmentation, pool manifests and the demo data. No Ray here."""

from almdn_ray.data.coco import read_coco, to_coco_dict, write_coco
from almdn_ray.data.records import DataProblems, Dataset, DatasetError, ImageRecord
from almdn_ray.data.validate import detect_format, read_dataset, validate_dataset
from almdn_ray.data.voc import VOC_CLASSES, read_voc

__all__ = [
    "read_coco", "to_coco_dict", "write_coco", "DataProblems", "Dataset", "DatasetError", "ImageRecord",
    "detect_format", "read_dataset", "validate_dataset", "VOC_CLASSES", "read_voc",
]  # fmt: skip
