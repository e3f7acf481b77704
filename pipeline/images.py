"""Image files: content keys, decoding to RGB exactly as HQ-SAM expects, and the resize geometry."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.shapes import IMAGE_SIZE, PLANE_SHAPE, PLANE_STRIDE
from pipeline.errors import RefineError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Pillow's own decompression-bomb guard, made an error instead of a warning; ~180 megapixels.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 178_956_970


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise RefineError(f"{path}: cannot read image file ({error.strerror or error})") from None


def content_key(data: bytes) -> str:
    """Hash of a file's bytes: a rename, move or copy keeps it, any change to the file changes it.

    BLAKE2b runs at ~1 GB/s, so keying costs ~0.1 ms for a typical JPEG against ~1 s of encoder.
    """
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def resized_shape(height: int, width: int, longest: int = IMAGE_SIZE) -> tuple[int, int]:
    """SAM's ResizeLongestSide.get_preprocess_shape: scale so the longest side is `longest`."""
    scale = longest / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def load_rgb(path: Path, data: bytes | None = None) -> Image.Image:
    """Decode fully (truncation is an error), apply EXIF orientation, convert any mode to 8-bit RGB.

    `data`, when given, is the file's content already read (so a file is read once); `path` names it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise RefineError(
                        f"{path}: image too large ({opened.width} x {opened.height}, over {MAX_PIXELS} pixels)"
                    )
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except RefineError:
        raise
    except UnidentifiedImageError:
        raise RefineError(f"{path}: not a readable image (unknown or empty format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RefineError(f"{path}: image too large ({_first_line(error)})") from None
    except Exception as error:  # each of Pillow's decoders fails in its own way on damaged bytes
        raise RefineError(f"{path}: image is truncated or corrupt ({_first_line(error)})") from None
    if image.width < 1 or image.height < 1:
        raise RefineError(f"{path}: image has no pixels ({image.width} x {image.height})")
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: Pillow's convert("RGB") would clip at 255, so rescale the full range.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        span = max(values.max(initial=0) - values.min(initial=0), 1e-12)
        gray = ((values - values.min(initial=0)) / span * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def prepare(path: Path, data: bytes | None = None) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Decode and resize one image for the encoder.

    Returns the resized image padded with zeros to 3 x 1024 x 1024 (uint8; the encoder normalises and
    masks the padding), the original (height, width) after orientation, and the resized (height, width).
    """
    image = load_rgb(path, data)
    original = (image.height, image.width)
    resized = resized_shape(*original)
    # Same resampling as SAM's ResizeLongestSide (torchvision resize of a PIL image: bilinear).
    pixels = np.asarray(image.resize((resized[1], resized[0]), Image.Resampling.BILINEAR))
    padded = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    padded[:, : resized[0], : resized[1]] = pixels.transpose(2, 0, 1)
    return padded, original, resized


def stride4_plane(pixels: np.ndarray) -> np.ndarray:
    """B x 3 x 1024 x 1024 uint8 encoder inputs -> B x 3 x 256 x 256 uint8 planes: each value the rounded mean
    of 4 x 4 pixels (the padding stays 0)."""
    _, height, width = PLANE_SHAPE
    blocks = pixels.reshape(len(pixels), 3, height, PLANE_STRIDE, width, PLANE_STRIDE)
    return (blocks.mean(axis=(3, 5), dtype=np.float32) + 0.5).astype(np.uint8)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
