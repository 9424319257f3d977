"""Reading images by URI: full decodes with ``torchvision.io.decode_image``, sizes from the header only."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from almdn_ray import storage

__all__ = ["ImageReadError", "IMAGE_SUFFIXES", "MAX_PIXELS", "read_image", "decode_image_bytes", "image_size"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


HEADER_BYTES = 64 * 1024  # what image_size reads first


class ImageReadError(OSError):
    """An image file is missing, truncated or not an image; the message names the URI."""


MAX_PIXELS = 150_000_000  # larger images (a 12k x 12k scan) are refused, not decoded into gigabytes


def _as_rgb8(pixels: torch.Tensor) -> torch.Tensor:
    """Any decoder output as ``[3, H, W]`` uint8: the first frame of an animation, 16-bit scaled to 8."""
    if pixels.ndim == 4:  # animated GIF / WebP: [T, C, H, W]
        pixels = pixels[0]
    if pixels.dtype != torch.uint8:
        top = 65535.0 if pixels.dtype in (torch.uint16, torch.int32) else float(pixels.max().clamp(min=1))
        pixels = (pixels.float() * (255.0 / top)).round().clamp(0, 255).to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    elif pixels.shape[0] == 4:
        pixels = pixels[:3]
    return pixels.contiguous()


def _decode_with_pillow(data: bytes) -> torch.Tensor:
    """TIFF, BMP, CMYK and other kinds torchvision's decoders do not take: Pillow, first frame, RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        rgb = image.convert("RGB")
        return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode_image_bytes(data: bytes, uri: str) -> torch.Tensor:
    """Decode encoded image bytes to ``[3, H, W]`` uint8 RGB, whatever the image's kind.

    Grayscale, RGBA, palette, 16-bit, CMYK, animated (first frame), TIFF and BMP images are converted;
    empty, truncated, zero-size, unreadable and huge (> :data:`MAX_PIXELS`) ones raise :class:`ImageReadError`.
    """
    if not data:
        raise ImageReadError(f"{uri}: the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            if data.startswith(_PNG_SIGNATURE):
                # torchvision's PNG decoder crashes the process (SIGSEGV) on a chunk with corrupt data;
                # Pillow's verify() checks every chunk's CRC first, without decoding pixels (~0.05 ms).
                header.verify()
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{uri}: image too large to decode ({error})") from error
    except Exception as error:  # Pillow raises SyntaxError, OSError, ValueError … for broken files
        kind = "corrupt PNG" if data.startswith(_PNG_SIGNATURE) else "corrupt or truncated image"
        raise ImageReadError(f"{uri}: {kind} ({error}); re-export or remove it") from error
    if width < 1 or height < 1:
        raise ImageReadError(f"{uri}: the image has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            f"{uri}: {width}x{height} is over {MAX_PIXELS:,} pixels; downscale it before adding it to a dataset"
        )
    try:
        pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as first:
        try:
            pixels = _decode_with_pillow(data)
        except Exception as error:
            reason = str(first).strip().splitlines()[0] if str(first).strip() else "undecodable"
            raise ImageReadError(f"{uri}: corrupt or truncated image ({reason}); re-export or remove it") from error
    pixels = _as_rgb8(pixels)
    if tuple(pixels.shape) != (3, height, width):
        raise ImageReadError(f"{uri}: decoded to {tuple(pixels.shape)}, the header says {width}x{height}")
    return pixels


def read_image(uri: str) -> torch.Tensor:
    """Read and decode an image (local or ``s3://``) to ``[3, H, W]`` uint8 RGB."""
    return decode_image_bytes(_read(uri), uri)


def image_size(uri: str) -> tuple[int, int]:
    """``(width, height)`` from the image header, without decoding the pixels: the file's first 64 KiB are
    read (every header we know fits, EXIF thumbnails included), the whole file only when they do not do."""
    head = _read(uri, limit=HEADER_BYTES)
    try:
        return _header_size(head, uri)
    except ImageReadError:
        if len(head) < HEADER_BYTES:  # that was the whole file
            raise
    return _header_size(_read(uri), uri)


def _header_size(data: bytes, uri: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{uri}: image too large to decode ({error})") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ImageReadError(f"{uri}: not a readable image ({error}); re-export or remove it") from error


def _read(uri: str, limit: int | None = None) -> bytes:
    """A file's bytes (its first ``limit``); a missing file is an unreadable image, other storage errors are
    the storage's own (they name the URI and what to check)."""
    try:
        return storage.read_bytes(uri, limit=limit)
    except FileNotFoundError as error:
        raise ImageReadError(f"{uri}: image file is missing") from error
