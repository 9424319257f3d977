"""Reading images by URI: full decodes with ``torchvision.io.decode_image``, sizes from the header only."""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from almdn_ray import storage

__all__ = ["ImageReadError", "IMAGE_SUFFIXES", "read_image", "decode_image_bytes", "image_size"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageReadError(OSError):
    """An image file is missing, truncated or not an image; the message names the URI."""


def decode_image_bytes(data: bytes, uri: str) -> torch.Tensor:
    """Decode encoded image bytes to ``[3, H, W]`` uint8 RGB."""
    if not data:
        raise ImageReadError(f"{uri}: the file is empty")
    if data.startswith(_PNG_SIGNATURE):
        # torchvision's PNG decoder crashes the process (SIGSEGV) on a chunk with corrupt data; Pillow's
        # verify() checks every chunk's CRC first, without decoding pixels (~0.05 ms).
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except Exception as error:  # Pillow raises SyntaxError, OSError, ValueError … for broken files
            raise ImageReadError(f"{uri}: corrupt PNG ({error}); re-export or remove it") from error
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "undecodable"
        raise ImageReadError(f"{uri}: corrupt or truncated image ({reason}); re-export or remove it") from error


def read_image(uri: str) -> torch.Tensor:
    """Read and decode an image (local or ``s3://``) to ``[3, H, W]`` uint8 RGB."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as error:
        raise ImageReadError(f"{uri}: image file is missing") from error
    return decode_image_bytes(data, uri)


def image_size(uri: str) -> tuple[int, int]:
    """``(width, height)`` from the image header, without decoding the pixels."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as error:
        raise ImageReadError(f"{uri}: image file is missing") from error
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise ImageReadError(f"{uri}: not a readable image ({error}); re-export or remove it") from error
