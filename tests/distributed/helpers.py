"""Small on-disk datasets for the distributed tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from almdn_ray.data.records import ImageRecord
from tests.conftest import encode_image

SIZE = 96


def write_scenes(folder: Path, count: int, *, seed: int = 0, corrupt: tuple[int, ...] = ()) -> list[ImageRecord]:
    """``count`` PNGs of noise with one or two coloured squares (class 1 red, class 2 blue), as records."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        image = (rng.random((SIZE, SIZE, 3)) * 100).astype(np.uint8)
        boxes, labels = [], []
        for j in range(1 + i % 2):
            label = 1 + (i + j) % 2
            side = int(rng.integers(24, 40))
            x0, y0 = int(rng.integers(0, SIZE - side)), int(rng.integers(0, SIZE - side))
            image[y0 : y0 + side, x0 : x0 + side] = (230, 40, 40) if label == 1 else (40, 60, 230)
            boxes.append([x0, y0, x0 + side, y0 + side])
            labels.append(label)
        path = folder / f"scene_{i:04d}.png"
        data = encode_image(image)
        path.write_bytes(data[: len(data) // 3] if i in corrupt else data)
        records.append(
            ImageRecord(
                f"scene_{i:04d}",
                str(path),
                SIZE,
                SIZE,
                np.asarray(boxes, np.float32),
                np.asarray(labels, np.int64),
                np.zeros(len(labels), bool),
            )
        )
    return records
