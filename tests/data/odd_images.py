"""One file of each odd image kind a real pool holds, and what reading it must give."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_odd_images(folder: Path) -> dict[str, tuple[str, str | None]]:
    """``name -> (path, None if it must decode to RGB else a piece of the error)``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    sixteen = Image.fromarray(rng.integers(0, 65535, (40, 56), dtype=np.uint16))
    files = {
        "animated.gif": (animated.getvalue(), None),
        "cmyk.jpg": (_save(rgb.convert("CMYK"), "JPEG"), None),
        "sixteen_bit.png": (_save(sixteen, "PNG"), None),
        "gray.png": (_save(rgb.convert("L"), "PNG"), None),
        "rgba.png": (_save(rgb.convert("RGBA"), "PNG"), None),
        "palette.png": (_save(rgb.convert("P"), "PNG"), None),
        "scan.tif": (_save(rgb, "TIFF"), None),
        "old.bmp": (_save(rgb, "BMP"), None),
        "truncated.jpg": (_save(rgb, "JPEG")[:300], "corrupt or truncated image"),
        "empty.png": (b"", "the file is empty"),
        "text.jpg": (b"this is not an image at all" * 10, "corrupt or truncated image"),
        "huge.png": (_save(Image.new("RGB", (120, 100)), "PNG"), "pixels; downscale it"),  # over a lowered limit
    }
    out = {}
    for name, (data, error) in files.items():
        (folder / name).write_bytes(data)
        out[name] = (str(folder / name), error)
    return out
