"""Detection metrics: PASCAL VOC AP (11-point VOC07 and area) and COCO AP through pycocotools.

Both take the same per-image lists: ground truth ``{"boxes": [G, 4] xyxy, "labels": [G], "difficult": [G]}``
and detections ``{"boxes": [D, 4], "scores": [D], "labels": [D]}`` (numpy arrays or CPU tensors).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["voc_mean_ap", "voc_average_precision", "coco_metrics", "evaluate"]

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _as_array(value, dtype) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=dtype)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with ``[G, 4]`` boxes, continuous coordinates (no +1)."""
    ix1, iy1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    ix2, iy2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(np.float64).eps)


def voc_average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """AP from a precision/recall curve: VOC07's 11-point interpolation, or the area under the envelope."""
    if use_07_metric:
        points = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _class_ap(label: int, detections, ground_truths, iou_threshold: float, use_07_metric: bool) -> float | None:
    gt_boxes, gt_difficult, matched = [], [], []
    for gt in ground_truths:
        mask = _as_array(gt["labels"], np.int64) == label
        gt_boxes.append(_as_array(gt["boxes"], np.float64).reshape(-1, 4)[mask])
        gt_difficult.append(_as_array(gt.get("difficult", np.zeros(mask.shape, bool)), bool)[mask])
        matched.append(np.zeros(int(mask.sum()), bool))
    num_positives = sum(int((~d).sum()) for d in gt_difficult)
    if num_positives == 0:
        return None  # class absent from the ground truth (or only difficult): not part of the mean
    images, scores, boxes = [], [], []
    for index, det in enumerate(detections):
        mask = _as_array(det["labels"], np.int64) == label
        images.append(np.full(int(mask.sum()), index))
        scores.append(_as_array(det["scores"], np.float64)[mask])
        boxes.append(_as_array(det["boxes"], np.float64).reshape(-1, 4)[mask])
    images, scores, boxes = np.concatenate(images), np.concatenate(scores), np.concatenate(boxes)
    true_positive, false_positive = [], []
    for d in np.argsort(-scores, kind="stable"):
        candidates = gt_boxes[images[d]]
        if len(candidates):
            ious = _iou(boxes[d], candidates)
            best = int(np.argmax(ious))
            if ious[best] > iou_threshold:
                if gt_difficult[images[d]][best]:
                    continue  # a match to a difficult box counts neither way
                if not matched[images[d]][best]:
                    matched[images[d]][best] = True
                    true_positive.append(1.0)
                    false_positive.append(0.0)
                    continue
        true_positive.append(0.0)  # no overlap, or a duplicate of an already matched box
        false_positive.append(1.0)
    tp, fp = np.cumsum(true_positive), np.cumsum(false_positive)
    recall = tp / num_positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_average_precision(recall, precision, use_07_metric)


def voc_mean_ap(
    detections: Sequence[dict], ground_truths: Sequence[dict], iou_threshold: float = 0.5, use_07_metric: bool = True
) -> dict:
    """PASCAL VOC mean AP, as the VOC devkit (and the paper) computes it.

    Per class, detections are taken by descending score; one is a true positive when the ground-truth box
    of its class it overlaps most (IoU > ``iou_threshold``) is not yet matched, a false positive when that
    box is already matched (a duplicate) or nothing overlaps enough, and counts neither way when that box
    is difficult. Coordinates are continuous (no +1).

    Returns:
        ``{"map": float, "ap": {label: float}}``; the mean is over classes with at least one non-difficult
        ground-truth box.
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truths)} images")
    labels = sorted({int(x) for gt in ground_truths for x in _as_array(gt["labels"], np.int64)})
    ap = {}
    for label in labels:
        value = _class_ap(label, detections, ground_truths, iou_threshold, use_07_metric)
        if value is not None:
            ap[label] = value
    return {"map": float(np.mean(list(ap.values()))) if ap else 0.0, "ap": ap}


def coco_metrics(
    detections: Sequence[dict], ground_truths: Sequence[dict], *, image_sizes: Sequence[tuple[int, int]] | None = None
) -> dict[str, float]:
    """COCO box AP through pycocotools: ``AP`` (IoU .50:.95), ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``.

    ``difficult`` ground truth is passed as ``iscrowd`` (ignored as COCO ignores crowds). A size bucket
    without ground truth reads -1, as pycocotools reports it.

    Args:
        image_sizes: ``(width, height)`` per image (only recorded in the COCO structure).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truths)} images")
    labels = sorted({int(x) for gt in ground_truths for x in _as_array(gt["labels"], np.int64)})
    labels = sorted(set(labels) | {int(x) for d in detections for x in _as_array(d["labels"], np.int64)})
    dataset = {"images": [], "annotations": [], "categories": [{"id": label} for label in labels]}
    results = []
    for index, (det, gt) in enumerate(zip(detections, ground_truths), start=1):
        width, height = image_sizes[index - 1] if image_sizes else (0, 0)
        dataset["images"].append({"id": index, "width": width, "height": height})
        boxes = _as_array(gt["boxes"], np.float64).reshape(-1, 4)
        crowd = _as_array(gt.get("difficult", np.zeros(len(boxes), bool)), bool)
        for box, label, is_crowd in zip(boxes, _as_array(gt["labels"], np.int64), crowd):
            w, h = box[2] - box[0], box[3] - box[1]
            dataset["annotations"].append(
                {
                    "id": len(dataset["annotations"]) + 1,
                    "image_id": index,
                    "category_id": int(label),
                    "bbox": [*box[:2].tolist(), w, h],
                    "area": float(w * h),
                    "iscrowd": int(is_crowd),
                }
            )
        for box, score, label in zip(
            _as_array(det["boxes"], np.float64).reshape(-1, 4),
            _as_array(det["scores"], np.float64),
            _as_array(det["labels"], np.int64),
        ):
            results.append(
                {
                    "image_id": index,
                    "category_id": int(label),
                    "score": float(score),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    if not results or not dataset["annotations"]:
        return dict.fromkeys(COCO_KEYS, 0.0)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        ground = COCO()
        ground.dataset = dataset
        ground.createIndex()
        evaluator = COCOeval(ground, ground.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("pycocotools:\n%s", captured.getvalue())
    return {key: float(value) for key, value in zip(COCO_KEYS, evaluator.stats[:6])}


def evaluate(
    model,
    dataset,
    *,
    batch_size: int = 8,
    device=None,
    config=None,
    log_every: int = 20,
    data_workers: int = 0,
    bf16: bool = False,
) -> dict:
    """Detect on every image of a :class:`~almdn_ray.data.records.Dataset` and measure VOC and COCO AP.

    Images are resized to the model's input (in ``data_workers`` loader processes); detections are scaled
    back to each image's own size. ``bf16``: the forward passes under bf16 autocast.

    Returns:
        ``{"map_voc07", "map_area", "ap_voc07": {class name: AP}, "coco": {AP, AP50, AP75, APs, APm, APl},
        "num_images"}``.
    """
    import torch
    from torch.utils.data import DataLoader

    from almdn_ray import engine
    from almdn_ray.data.transforms import DetectionDataset, eval_transform
    from almdn_ray.model import PostprocessConfig

    config = config or PostprocessConfig(min_confidence=0.0, pre_nms_top_k=400)
    size = model.image_size
    records = dataset.records
    loader = DataLoader(
        DetectionDataset(records, eval_transform(size), keep_difficult=True),
        batch_size=batch_size,
        collate_fn=engine.collate,
        num_workers=data_workers,
    )
    detections = []
    for step, (images, _) in enumerate(loader):
        for det in engine.predict(model, images, config=config, batch_size=batch_size, device=device, bf16=bf16):
            record = records[len(detections)]
            scale = torch.tensor([record.width / size, record.height / size] * 2)
            detections.append({"boxes": det.boxes * scale, "scores": det.scores, "labels": det.labels})
        if log_every and (step + 1) % log_every == 0:
            logger.info("evaluated %d / %d images", len(detections), len(records))
    truths = [{"boxes": r.boxes, "labels": r.labels, "difficult": r.difficult} for r in records]
    voc07 = voc_mean_ap(detections, truths, use_07_metric=True)
    area = voc_mean_ap(detections, truths, use_07_metric=False)
    coco = coco_metrics(detections, truths, image_sizes=[(r.width, r.height) for r in records])
    return {
        "map_voc07": voc07["map"],
        "map_area": area["map"],
        "ap_voc07": {dataset.classes[label - 1]: value for label, value in voc07["ap"].items()},
        "coco": coco,
        "num_images": len(records),
    }
