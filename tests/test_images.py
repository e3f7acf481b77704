"""Decoding as HQ-SAM expects: EXIF orientation, every pixel mode to 8-bit RGB, SAM's resize geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import RefineError
from pipeline.images import content_key, load_rgb, prepare, read_file, resized_shape


def test_exif_orientation_is_applied(tmp_path: Path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    image = load_rgb(path)
    assert image.size == (20, 40)  # width and height swapped
    top = np.asarray(image)[:5].mean()
    bottom = np.asarray(image)[-5:].mean()
    assert top > 200 and bottom < 50  # the left band is now on top


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(np.full((8, 8), 128, np.uint8), mode="L"),
        lambda: Image.fromarray(np.full((8, 8, 4), (10, 200, 30, 0), np.uint8), mode="RGBA"),
        lambda: Image.fromarray(np.full((8, 8, 3), (10, 200, 30), np.uint8)).convert(
            "P", palette=Image.Palette.ADAPTIVE
        ),
        lambda: Image.fromarray(np.full((8, 8), 1, np.uint8), mode="L").convert("1"),
    ],
    ids=["grayscale", "rgba", "palette", "bilevel"],
)
def test_every_mode_becomes_rgb(tmp_path: Path, make):
    path = tmp_path / "image.png"
    make().save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (8, 8)


def test_16_bit_grayscale_keeps_its_range(tmp_path: Path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    pixels = np.asarray(load_rgb(path))
    assert pixels.shape == (8, 8, 3)
    assert pixels.min() == 0 and pixels.max() == 255  # scaled, not clipped to white
    assert len(np.unique(pixels[..., 0])) > 32


def test_resize_geometry_matches_sam():
    assert resized_shape(480, 640) == (768, 1024)
    assert resized_shape(1000, 10) == (1024, 10)
    assert resized_shape(1, 1) == (1024, 1024)


def test_prepare_pads_bottom_right(tmp_path: Path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((50, 100, 3), 77, np.uint8)).save(path)
    padded, original, resized = prepare(path)
    assert padded.shape == (3, 1024, 1024) and padded.dtype == np.uint8
    assert original == (50, 100) and resized == (512, 1024)
    assert (padded[:, :512] == 77).all() and (padded[:, 512:] == 0).all()


def test_content_key_follows_bytes_not_names(tmp_path: Path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(a)
    b.write_bytes(a.read_bytes())
    Image.fromarray(np.ones((4, 4, 3), np.uint8)).save(c)
    assert content_key(read_file(a)) == content_key(read_file(b)) != content_key(read_file(c))


def test_huge_image_is_refused_before_decoding(tmp_path: Path):
    path = tmp_path / "huge.png"
    # A 20000 x 20000 PNG of one colour is small on disk but 1.2 GB decoded.
    Image.new("L", (20000, 20000)).save(path, optimize=False)
    with pytest.raises(RefineError, match="huge.png: image too large"):
        load_rgb(path)
