"""Every hostile or unusual image kind is decoded correctly or refused with a reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from rdcd.decode import DecodeConfig, DecodeError, decode_image, load_for_model


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(shared_photos=None) -> Image.Image:
    """A real photo when shared data exists, else a scikit-image sample photo."""
    if shared_photos:
        return Image.open(shared_photos[0]).convert("RGB")
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def photo(request):
    try:
        shared = request.getfixturevalue("photos")
    except pytest.skip.Exception:
        shared = None
    return _photo(shared)


def test_plain_jpeg(photo):
    out = decode_image(_save(photo, "JPEG", quality=90))
    assert out.mode == "RGB" and out.size == photo.size


def test_zero_byte():
    with pytest.raises(DecodeError, match="zero-byte"):
        decode_image(b"")


def test_text_named_jpg():
    with pytest.raises(DecodeError, match="not an image.*text"):
        decode_image(b"<html><body>404 Not Found</body></html>")


def test_truncated_jpeg(photo):
    data = _save(photo, "JPEG", quality=90)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_garbage_after_valid_header(photo):
    data = _save(photo, "PNG")
    corrupted = data[:100] + bytes(len(data) - 100)
    with pytest.raises(DecodeError):
        decode_image(corrupted)


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    row = b"\x00" + bytes((width + 7) // 8)
    idat = zlib.compress(row * 16, 9)  # a few rows only: the file stays small
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb():
    data = _png_bomb(30_000, 30_000)
    assert len(data) < 50_000
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(data)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(_png_bomb(2000, 2000), config=DecodeConfig(max_pixels=1_000_000))


def test_cmyk_jpeg(photo):
    data = _save(photo.convert("CMYK"), "JPEG", quality=95)
    out = np.asarray(decode_image(data), dtype=np.float32)
    ref = np.asarray(photo, dtype=np.float32)
    assert out.shape == ref.shape
    assert np.abs(out - ref).mean() < 12  # colours survive the CMYK round trip


def test_sixteen_bit_png():
    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = _save(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(decode_image(data))
    assert out.shape == (64, 64, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255  # rescaled, not clipped
    assert 120 <= out[32, 0, 0] <= 135


def test_palette_with_transparency_goes_to_white():
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    data = _save(img, "PNG", transparency=0)
    out = decode_image(data)
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "1", "P"])
def test_every_mode_to_rgb(photo, mode):
    img = photo.resize((64, 48)).convert(mode)
    out = decode_image(_save(img, "PNG"))
    assert out.mode == "RGB" and out.size == (64, 48)


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(_save(img, "PNG")).getpixel((1, 1)) == (255, 255, 255)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    r, g, b = decode_image(data).getpixel((16, 16))
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    out = decode_image(_save(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_draft_keeps_size_above_target(photo):
    big = photo.resize((2000, 1600))
    data = _save(big, "JPEG", quality=90)
    out = decode_image(data, size=288)
    assert 288 <= min(out.size) < 1600  # decoded at a reduced DCT scale, still >= target
    arr = load_for_model(data, 288)
    assert arr.shape == (288, 288, 3) and arr.dtype == np.uint8


def test_full_decode_budget_refuses_a_flat_png_a_jpeg_of_its_size_passes():
    """The reported attack: a ~0.3 MB 7999x7999 PNG under the 64 MP bomb limit cost 1.6 s and
    +0.8 GB per request. PNG is decoded in full, so it must fit the model's decode budget; a JPEG
    of the same pixel count is decoded at 1/8 scale and passes; a 24 MP photo PNG still passes."""
    config = DecodeConfig()
    assert config.pixel_budget(288) == 25_000_000  # the floor: a 288 px model
    assert config.pixel_budget(448) == 256 * 448 * 448  # grows with the model's input
    assert config.pixel_budget(1024) == config.pixel_budget(None) == config.max_pixels
    flat = Image.new("L", (7999, 7999), 200)
    png = _save(flat, "PNG", compress_level=1)
    assert len(png) < 500_000 and 7999 * 7999 < config.max_pixels
    with pytest.raises(DecodeError, match="exceeds") as refused:  # "exceeds": HTTP 413
        load_for_model(png, 288, config)
    assert "PNG" in refused.value.reason and "budget" in refused.value.reason
    arr = load_for_model(_save(flat, "JPEG", quality=80), 288, config)
    assert arr.shape == (288, 288, 3) and abs(int(arr.mean()) - 200) <= 2
    del flat
    phone = _save(Image.new("L", (6000, 4000), 90), "PNG", compress_level=1)  # a 24 MP camera
    assert load_for_model(phone, 288, config).shape == (288, 288, 3)
    # the budget counts pixels decoded, so a smaller model budget refuses the 24 MP PNG too
    with pytest.raises(DecodeError, match="exceeds"):
        load_for_model(phone, 288, DecodeConfig(decode_budget_pixels=12_000_000))


@pytest.mark.parametrize(
    "fmt,name",
    [("EPS", "EPS"), ("ICO", "ICO"), ("PCX", "PCX"), ("SGI", "SGI"), ("PPM", "Netpbm"),
     ("PDF", "PDF"), ("TGA", None), ("SPIDER", None)],
)  # fmt: skip
def test_formats_outside_the_allow_list_are_refused(fmt, name):
    """Only the plug-ins of ALLOWED_FORMATS parse untrusted bytes; PIL opened (and, for EPS,
    handed to Ghostscript) every format it knows. A refusal says "not an image" (HTTP 415)."""
    data = _save(Image.new("RGB", (40, 30), (10, 200, 30)), fmt)  # EPS: no Ghostscript to write
    with pytest.raises(DecodeError, match="^not an image: ") as refused:
        load_for_model(data, 32)
    if name is not None:
        assert f"unsupported image format {name}" in refused.value.reason
    assert "accepted: JPEG" in refused.value.reason


@pytest.mark.parametrize("fmt", ["JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF"])
def test_every_allowed_format_decodes(fmt):
    img = Image.new("RGB", (64, 48), (10, 200, 30))
    kw = {"save_all": True, "append_images": [img]} if fmt == "MPO" else {}
    arr = load_for_model(_save(img, fmt, **kw), 32)
    assert arr.shape == (32, 32, 3)
    assert np.abs(arr[16, 16].astype(int) - (10, 200, 30)).max() <= 4


def test_mpo_phone_photo_is_drafted_like_a_jpeg():
    """Phones write MPO (a JPEG with extra frames) as `.jpg`: it gets JPEG's reduced-scale
    decode too, rather than a full decode of every pixel."""
    img = Image.new("RGB", (4000, 3000), (10, 200, 30))
    data = _save(img, "MPO", save_all=True, append_images=[img])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = decode_image(data, size=288)
    assert out.size == (500, 375)  # 1/8 scale, still covering 288 x 288
