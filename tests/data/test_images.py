import numpy as np
import pytest
import torch

from almdn_ray import storage
from almdn_ray.data import images
from almdn_ray.data.images import ImageReadError, image_size, read_image
from tests.conftest import encode_image, random_image


def test_reads_png_and_jpeg(tmp_path):
    pixels = random_image(40, 30)
    (tmp_path / "a.png").write_bytes(encode_image(pixels))
    (tmp_path / "b.jpg").write_bytes(encode_image(pixels, "JPEG"))
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.png")).permute(1, 2, 0).numpy(), pixels)
    assert read_image(str(tmp_path / "b.jpg")).shape == (3, 30, 40)


def test_corrupt_png_truncated_jpeg_and_missing_files_are_named(tmp_path):
    png = encode_image(random_image(64, 64))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png[:100] + b"x" * 50 + png[150:])  # damaged IDAT data (would crash libpng)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(encode_image(random_image(64, 64), "JPEG")[:300])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, reason in (
        (corrupt, "corrupt PNG"),
        (truncated, "corrupt or truncated image"),
        (empty, "the file is empty"),
        (tmp_path / "gone.png", "image file is missing"),
    ):
        with pytest.raises(ImageReadError, match=reason) as caught:
            read_image(str(path))
        assert str(path) in str(caught.value)


def test_size_comes_from_the_header_without_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(encode_image(random_image(123, 45)))
    monkeypatch.setattr(images, "decode_image", None)  # a decode would fail: the header must suffice
    assert image_size(str(path)) == (123, 45)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png: not a readable image"):
        image_size(str(tmp_path / "notes.png"))


def test_storage_errors_name_the_uri(s3_endpoint, s3_bucket):
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/nothing.png does not exist"):
        storage.read_bytes(f"{s3_bucket}/nothing.png")
    with pytest.raises(storage.StorageError, match="bucket does not exist"):
        storage.write_bytes("s3://no-such-bucket-here/x.json", b"{}")
    with pytest.raises(storage.StorageError, match="unsupported storage URI"):
        storage.resolve("gs://bucket/x")


def test_every_odd_image_kind_decodes_to_rgb_or_is_an_error_naming_it(tmp_path, monkeypatch):
    from tests.data.odd_images import write_odd_images

    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)  # the "huge" image is 120 x 100
    for name, (path, error) in write_odd_images(tmp_path).items():
        if error is None:
            pixels = images.read_image(path)
            assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, 40, 56), name
        else:
            with pytest.raises(images.ImageReadError, match=error) as caught:
                images.read_image(path)
            assert path in str(caught.value), name
    gray = images.read_image(str(tmp_path / "gray.png"))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    sixteen = images.read_image(str(tmp_path / "sixteen_bit.png"))
    assert sixteen.max() > 200  # 16-bit scaled to 8, not clipped to 255 or truncated to 0
