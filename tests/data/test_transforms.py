import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from almdn_ray.data.records import ImageRecord
from almdn_ray.data.transforms import DetectionDataset, eval_transform, train_transform
from tests.conftest import encode_image


def scene(seed):
    """A 120x90 image with two rectangles, their boxes, and a mask that marks them (for checking geometry)."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.integers(0, 255, (3, 90, 120), dtype=np.uint8))
    boxes = torch.tensor([[10.0, 15.0, 50.0, 60.0], [70.0, 30.0, 110.0, 80.0]])
    mask = torch.zeros(2, 90, 120, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        mask[i, y1:y2, x1:x2] = 1
    return (
        tv_tensors.Image(image),
        tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(90, 120)),
        tv_tensors.Mask(mask),
    )


@pytest.mark.parametrize("seed", range(12))
def test_boxes_follow_the_image_through_every_step(seed):
    torch.manual_seed(seed)
    image, boxes, mask = scene(seed)
    transform = train_transform(64, flip=True, zoom_out=3.0)
    out_image, target = transform(image, {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": mask})
    assert out_image.shape == (3, 64, 64) and out_image.dtype == torch.float32
    assert 0.0 <= out_image.min() and out_image.max() <= 1.0
    # The masks were moved by the same geometry as the image: every kept box is its mask's bounding box.
    for box, object_mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(object_mask, as_tuple=True)
        assert len(xs) > 0
        mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        torch.testing.assert_close(box, mask_box, atol=1.5, rtol=0)


def test_photometric_distortion_alone_moves_nothing():
    from torchvision.transforms import v2

    image, boxes, _ = scene(0)
    out_image, out_boxes = v2.RandomPhotometricDistort(p=1.0)(image, boxes)
    torch.testing.assert_close(out_boxes, boxes)
    assert not torch.equal(out_image, image)


def test_eval_transform_scales_boxes_with_the_image():
    image, boxes, _ = scene(1)
    out_image, out_boxes = eval_transform(60)(image, boxes)
    assert out_image.shape == (3, 60, 60)
    torch.testing.assert_close(out_boxes[0], torch.tensor([5.0, 10.0, 25.0, 40.0]))


def test_dataset_reads_images_and_drops_difficult_boxes(tmp_path):
    pixels = np.zeros((40, 80, 3), np.uint8)
    (tmp_path / "a.png").write_bytes(encode_image(pixels))
    record = ImageRecord(
        "a",
        str(tmp_path / "a.png"),
        80,
        40,
        np.array([[0, 0, 40, 20], [40, 20, 80, 40]], np.float32),
        np.array([1, 2]),
        np.array([False, True]),
    )
    image, target = DetectionDataset([record], eval_transform(20))[0]
    assert image.shape == (3, 20, 20)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert target["labels"].tolist() == [1]
    wrong = ImageRecord("a", str(tmp_path / "a.png"), 81, 40, record.boxes, record.labels, record.difficult)
    with pytest.raises(ValueError, match="a.png: image is 80x40 but its annotation says 81x40"):
        DetectionDataset([wrong], eval_transform(20))[0]


def test_batch_jitter_moves_boxes_with_the_content_and_repeats_under_a_seed():
    from almdn_ray.data.transforms import batch_jitter

    images = torch.zeros(6, 3, 96, 96)
    images[:, :, 30:60, 20:44] = 1.0  # one white square per image (white stays white under channel swaps)
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 44.0, 60.0]]), "labels": torch.tensor([2])} for _ in range(6)]
    torch.manual_seed(3)
    out, moved = batch_jitter(images, targets, 0.2)
    torch.manual_seed(3)
    again, moved_again = batch_jitter(images, targets, 0.2)
    torch.testing.assert_close(out, again)
    shifts = set()
    for image, target, repeat in zip(out, moved, moved_again):
        torch.testing.assert_close(target["boxes"], repeat["boxes"])
        bright = image.mean(0) > image.mean(0).max() * 0.5
        ys, xs = torch.nonzero(bright, as_tuple=True)
        drawn = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        torch.testing.assert_close(target["boxes"][0], drawn, atol=1.6, rtol=0)
        shifts.add(tuple(target["boxes"][0].round().tolist()))
    assert len(shifts) > 1  # the images moved differently
    unchanged, same = batch_jitter(images, targets, 0.0)
    assert unchanged is images and same is targets
    # A box pushed mostly out of the image is dropped, with its label.
    edge = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}]
    dropped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        _, result = batch_jitter(torch.rand(1, 3, 96, 96), edge, 0.4)
        assert result[0]["boxes"].shape[0] == result[0]["labels"].shape[0]
        dropped += result[0]["boxes"].shape[0] == 0
    assert dropped > 0
