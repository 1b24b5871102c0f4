"""Image bytes to the pixels a model takes, safely.

Reference collections are full of files that break naive loaders: truncated uploads, zero-byte
objects, HTML error pages saved as `.jpg`, decompression bombs, CMYK scans, 16-bit PNGs, palette
images with transparency, animated GIFs and phone photos whose orientation lives in EXIF. Every
one of them is either decoded to a correct RGB image here or rejected with a `DecodeError` whose
`reason` a person can act on, so a bulk job can record it and carry on.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 megapixels: above any real photo, far below what would exhaust a worker's memory.
DEFAULT_MAX_PIXELS = 64_000_000


class DecodeError(ValueError):
    """An image that cannot be decoded; `reason` is short and human-readable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodeConfig:
    """Limits and speed-ups for decoding untrusted images."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = 100 * 1024 * 1024
    background: tuple[int, int, int] = (255, 255, 255)  # what transparent pixels become


def _sniff(data: bytes) -> str:
    head = data[:16]
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"{", b"[")):
        return "looks like text/HTML/JSON"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "looks like text"
    return f"starts with bytes {head[:8].hex()}"


def _open(data: bytes, config: DecodeConfig) -> Image.Image:
    if len(data) == 0:
        raise DecodeError("zero-byte file")
    if len(data) > config.max_bytes:
        raise DecodeError(f"file of {len(data)} bytes exceeds the {config.max_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            # The pixel limit is ours (config.max_pixels, checked below), not PIL's global one.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise DecodeError(f"not an image: unrecognised format ({_sniff(data)})") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt headers raise many types
        raise DecodeError(f"unreadable image header: {type(exc).__name__}: {exc}") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid image size {width}x{height}")
    if width * height > config.max_pixels:
        raise DecodeError(
            f"decompression bomb refused: {width}x{height} = {width * height} pixels exceeds the "
            f"{config.max_pixels}-pixel limit"
        )
    return img


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    """'I;16*', 'I' and 'F' grey images to 8-bit 'L' by their nominal range, not a plain clip."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float32) / 257.0
    elif img.mode == "I":
        arr = arr.astype(np.float32)
        arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
    else:  # 'F'
        arr = arr.astype(np.float32)
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode to RGB. Transparency is composited onto `background`, 16-bit is rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _sixteen_bit_to_8(img).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes, size: int | None = None, config: DecodeConfig = DecodeConfig()
) -> Image.Image:
    """Decode `data` to an upright RGB image.

    With `size`, JPEGs are decoded at the smallest DCT scale that still covers `size` x `size`
    (PIL's draft mode: up to 8x less work for large photos); the caller resizes afterwards.
    """
    img = _open(data, config)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        if size is not None and img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.load()
    except DecodeError:
        raise
    except OSError as exc:
        text = str(exc)
        if "truncated" in text.lower() or "broken data stream" in text.lower():
            raise DecodeError(f"truncated image: {text}") from exc
        raise DecodeError(f"corrupt image data: {text}") from exc
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"corrupt image data: {type(exc).__name__}: {exc}") from exc
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        pass
    return to_rgb(img, config.background)


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Bilinear resize to `size` x `size` (the SSCD evaluation transform) as uint8 HWC."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_for_model(data: bytes, size: int, config: DecodeConfig = DecodeConfig()) -> np.ndarray:
    """Bytes to the uint8 `size` x `size` x 3 array every embedder in rdcd takes."""
    return resize_square(decode_image(data, size=size, config=config), size)
