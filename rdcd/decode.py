"""Image bytes to the pixels a model takes, safely.

Reference collections are full of files that break naive loaders: truncated uploads, zero-byte
objects, HTML error pages saved as `.jpg`, decompression bombs, CMYK scans, 16-bit PNGs, palette
images with transparency, animated GIFs and phone photos whose orientation lives in EXIF. Every
one of them is either decoded to a correct RGB image here or rejected with a `DecodeError` whose
`reason` a person can act on, so a bulk job can record it and carry on.

What a decode may cost is sized for the model, not for the file: only the plug-ins of
`ALLOWED_FORMATS` ever parse untrusted bytes (other formats are "not an image"), and the pixels
actually decoded must fit a budget of the model's input size (`DecodeConfig.pixel_budget`), so a
sub-megabyte PNG cannot buy seconds and gigabytes of an embedder while a 64 MP JPEG, decoded at
a reduced DCT scale, still passes.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 megapixels: above any real photo, far below what would exhaust a worker's memory. This is the
# absolute limit on what a header may claim, whatever the format.
DEFAULT_MAX_PIXELS = 64_000_000

# The PIL plug-ins that may even look at untrusted bytes: the formats of IMAGE_SUFFIXES in rdcd.io,
# plus MPO (what phones write as `.jpg`: a JPEG with extra frames). Every other plug-in (EPS, which
# runs Ghostscript; PSD, FITS, ICO, TGA, PCX, ...) is never tried, so its parser never sees them.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF")

# Formats PIL can decode at a reduced DCT scale (`draft`): 1/2, 1/4 or 1/8 per side, so a 64 MP
# JPEG costs the embedder about as much as a 1 MP one. Everything else is decoded in full.
DRAFT_FORMATS: tuple[str, ...] = ("JPEG", "MPO")

# The decode budget: pixels actually decoded (after `draft`), sized for the model, not the file.
# Figures from benchmarks/decode_budget.py: load_for_model at 288 px with every limit lifted, one
# fresh process per case, peak RSS added by the decode; on a shared 2-core machine, so times are
# noisy (+-50%) and memory is exact. Flat image (the attack) / photo content (a user):
#
#     MP | PNG file KB     decode s     +peak MB | JPEG s  +MB | progressive JPEG s  +MB
#      4 |   56 /  2940   0.13 / 0.27      22    |  0.11    7  |  0.06 / 0.08        17
#      8 |  108 /  4672   0.19 / 0.43      39    |  0.10    6  |  0.08 / 0.14        29
#     12 |  162 /  6117   0.26 / 0.61      55    |  0.07    7  |  0.10 / 0.13        40
#     16 |  215 /  7457   0.24 / 0.53      70    |  0.08    7  |  0.20 / 0.32        52
#     24 |  317 /  9713   0.35 / 0.73     102    |  0.07    8  |  0.24 / 0.21        76
#     36 |  474 / 12749   0.41 / 1.41     149    |  0.06    9  |  0.33 / 0.28       110
#     64 |  837 / 18218   0.74 / 2.20     258    |  0.07   10  |  0.54 / 0.42       192
#
# (PNG peaks were twice these, 491 MB at 64 MP, while `exif_transpose` copied every image.) A full
# decode costs ~4 bytes (RGBX) and 12-35 ns per pixel whatever the file size, so an 0.8 MB flat
# PNG buys ~1 s and a quarter GB of one embedder, while a JPEG of any size under `max_pixels`
# decodes in ~0.1 s and ~10 MB at 288 px; the refusal of an over-budget PNG reads its header
# only (~0.1 ms). The budget's floor, 25 MP, still takes every real camera or phone image (24 MP
# sensors are 6000x4000 to 6016x4016; 48-50 MP phones save JPEG, or 12 MP binned) and costs at
# most ~0.35 s / ~100 MB on a flat file, a third of the 64 MP attack. Above the floor the budget
# grows as 256 x image_size**2 (at most a 16x downscale per side): a 448 px training decode
# allows 51 MP and a 512 px model reaches `max_pixels`. Progressive JPEG keeps the JPEG limit:
# `draft` cuts its time less (coefficients of the whole image are buffered), but a 64 MP one
# still costs less than a 24 MP PNG.
DEFAULT_DECODE_BUDGET_PIXELS = 25_000_000
DEFAULT_DECODE_BUDGET_PER_INPUT = 256

# Magic numbers of formats that are refused, so the reason names what the file is.
_KNOWN_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "EPS (PostScript)"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"SIMPLE  =", "FITS"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"icns", "ICNS"),
    (b"\x01\xda", "SGI"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"II\xbc", "JPEG XR"),
    (b"v/1\x01", "OpenEXR"),
    (b"gimp xcf", "XCF"),
    (b"FORM", "IFF"),
    (b"BLP", "BLP"),
)
_FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC",
                b"hevc": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF"}  # fmt: skip


class DecodeError(ValueError):
    """An image that cannot be decoded; `reason` is short and human-readable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodeConfig:
    """Limits and speed-ups for decoding untrusted images.

    Two pixel limits, because a file's cost is what its decoder does, not its size in bytes:
    `max_pixels` bounds what any header may claim (the bomb limit), and the decode budget
    (`pixel_budget(size)`) bounds the pixels actually decoded for a model that takes `size` x
    `size`: a JPEG is decoded at a reduced DCT scale and fits whatever its size; PNG, GIF, BMP,
    WEBP and TIFF are decoded in full and must fit as they are.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = 100 * 1024 * 1024
    background: tuple[int, int, int] = (255, 255, 255)  # what transparent pixels become
    formats: tuple[str, ...] = ALLOWED_FORMATS  # PIL plug-ins allowed to open untrusted bytes
    decode_budget_pixels: int = DEFAULT_DECODE_BUDGET_PIXELS  # floor of the decode budget
    decode_budget_per_input: int = DEFAULT_DECODE_BUDGET_PER_INPUT  # x size**2 above the floor

    def pixel_budget(self, size: int | None) -> int:
        """Pixels a decode for a `size` x `size` model may produce; without `size` the caller
        wants full resolution (training views, reports), and only `max_pixels` applies."""
        if size is None:
            return self.max_pixels
        sized = max(self.decode_budget_pixels, self.decode_budget_per_input * size * size)
        return min(self.max_pixels, sized)


@functools.cache
def _plugins(formats: tuple[str, ...]) -> tuple[str, ...]:
    """The PIL openers for `formats`. MPO has none of its own: the JPEG opener returns it."""
    Image.init()  # registers every plug-in's opener: imports only, no bytes are parsed
    return tuple(f for f in formats if f in Image.OPEN)


def _known_format(data: bytes) -> str | None:
    """The name of a refused image format, by its magic number, without running its parser."""
    if data[4:8] == b"ftyp" and data[8:12] in _FTYP_BRANDS:
        return _FTYP_BRANDS[data[8:12]]
    for magic, name in _KNOWN_MAGIC:
        if data.startswith(magic):
            return name
    if len(data) > 2 and data[0] == 0x0A and data[1] in (0, 2, 3, 4, 5) and data[2] == 1:
        return "PCX"
    if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "Netpbm (PPM/PGM/PBM)"
    return None


def _refused(data: bytes, formats: tuple[str, ...]) -> str:
    name = _known_format(data)
    if name is not None:
        return f"not an image: unsupported image format {name} (accepted: {', '.join(formats)})"
    return f"not an image: unrecognised format ({_sniff(data)}; accepted: {', '.join(formats)})"


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
            # `formats`: only these plug-ins' parsers run; anything else is unidentified.
            img = Image.open(io.BytesIO(data), formats=_plugins(tuple(config.formats)))
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise DecodeError(_refused(data, config.formats)) from exc
    except Exception as exc:  # noqa: BLE001 - corrupt headers raise many types
        raise DecodeError(f"unreadable image header: {type(exc).__name__}: {exc}") from exc
    if img.format not in config.formats:  # a plug-in that opens a sibling format (JPEG -> MPO)
        raise DecodeError(
            f"not an image: unsupported image format {img.format} "
            f"(accepted: {', '.join(config.formats)})"
        )
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
    (PIL's draft mode: up to 8x less work per side for large photos); the caller resizes
    afterwards. The pixels left to decode must fit `config.pixel_budget(size)`: a JPEG of any
    size up to `max_pixels` does after `draft`, a PNG must as it is; refused, the reason says
    "exceeds" (HTTP 413 in rdcd.serve).
    """
    img = _open(data, config)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        if size is not None and img.format in DRAFT_FORMATS:
            img.draft("RGB", (size, size))
        width, height = img.size
        budget = config.pixel_budget(size)
        if width * height > budget:
            raise DecodeError(
                f"image too large to decode: {img.format} of {width}x{height} = "
                f"{width * height} pixels exceeds the {budget}-pixel decode budget for a "
                f"{size}px model ({img.format} is decoded in full; a JPEG may have up to "
                f"{config.max_pixels} pixels)"
            )
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
        # In place: the default returns a copy of every image, twice the peak memory of a decode.
        ImageOps.exif_transpose(img, in_place=True)
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
