import numpy as np
import pytest

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
