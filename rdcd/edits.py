"""Copy edits: the transformations that turn a reference photo into a query a system must match.

Used to build evaluation and demo query sets (DISC2021 queries are made the same way: crops,
overlays, text, emoji, recompression, colour changes, rotations, combinations). Every edit takes
a seeded `random.Random`, so a set rebuilt with the same seed is byte-identical. AugLy supplies
the fonts, emoji and several pixel operations; text is drawn with PIL on AugLy's fonts.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Sequence
from functools import lru_cache

import augly.image as imaugs
import augly.utils as augly_utils
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

Edit = Callable[[Image.Image, random.Random], Image.Image]

_WORDS = ("COPY", "sale", "lol", "breaking news", "#tbt", "meme", "2026", "wow", "share!", "ok")
_LATIN_FONTS = ("Roboto", "OpenSans", "Lato", "Oswald", "NotoSans", "Raleway", "Ubuntu", "Caviar")


@lru_cache(maxsize=1)
def font_files() -> list[str]:
    """AugLy's bundled TrueType fonts, Latin ones first choice (text stays legible)."""
    files = sorted(f for f in os.listdir(augly_utils.FONTS_DIR) if f.endswith(".ttf"))
    latin = [f for f in files if f.startswith(_LATIN_FONTS)]
    return [os.path.join(augly_utils.FONTS_DIR, f) for f in (latin or files)]


@lru_cache(maxsize=1)
def emoji_files() -> list[str]:
    """AugLy's bundled Twemoji PNGs."""
    out = []
    for root, _, names in sorted(os.walk(augly_utils.EMOJI_DIR)):
        out.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".png"))
    return out


def crop(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    frac = rng.uniform(0.45, 0.85)
    cw, ch = max(8, int(w * frac)), max(8, int(h * rng.uniform(frac * 0.9, min(1.0, frac * 1.1))))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=rng.randint(12, 35))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def text(img: Image.Image, rng: random.Random) -> Image.Image:
    out = img.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    size = max(10, int(min(out.size) * rng.uniform(0.08, 0.18)))
    font = ImageFont.truetype(rng.choice(font_files()), size)
    for _ in range(rng.randint(1, 2)):
        pos = (rng.uniform(0, 0.6) * out.size[0], rng.uniform(0, 0.85) * out.size[1])
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        draw.text(pos, rng.choice(_WORDS), font=font, fill=colour)
    return out


def emoji(img: Image.Image, rng: random.Random) -> Image.Image:
    return imaugs.overlay_emoji(
        img.convert("RGB"),
        emoji_path=rng.choice(emoji_files()),
        emoji_size=rng.uniform(0.15, 0.35),
        opacity=rng.uniform(0.7, 1.0),
        x_pos=rng.uniform(0.0, 0.7),
        y_pos=rng.uniform(0.0, 0.7),
    ).convert("RGB")


def colour(img: Image.Image, rng: random.Random) -> Image.Image:
    out = ImageEnhance.Brightness(img.convert("RGB")).enhance(rng.uniform(0.6, 1.4))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.6, 1.5))
    return ImageEnhance.Color(out).enhance(rng.uniform(0.3, 1.8))


def grayscale(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


def blur(img: Image.Image, rng: random.Random) -> Image.Image:
    return imaugs.blur(img.convert("RGB"), radius=rng.uniform(1.0, 3.0)).convert("RGB")


def flip(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.mirror(img)


def rotate90(img: Image.Image, rng: random.Random) -> Image.Image:
    return img.rotate(rng.choice((90, 180, 270)), expand=True)


def rotate(img: Image.Image, rng: random.Random) -> Image.Image:
    angle = rng.uniform(5, 25) * rng.choice((-1, 1))
    return imaugs.rotate(img.convert("RGB"), degrees=angle).convert("RGB")


def pad(img: Image.Image, rng: random.Random) -> Image.Image:
    colour_ = tuple(rng.randint(0, 255) for _ in range(3))
    return imaugs.pad(
        img.convert("RGB"),
        w_factor=rng.uniform(0.1, 0.4),
        h_factor=rng.uniform(0.1, 0.4),
        color=colour_,
    ).convert("RGB")


def resize(img: Image.Image, rng: random.Random) -> Image.Image:
    s = rng.uniform(0.3, 0.7)
    return img.resize((max(16, int(img.width * s)), max(16, int(img.height * s))), Image.BILINEAR)


def pixelize(img: Image.Image, rng: random.Random) -> Image.Image:
    return imaugs.pixelization(img.convert("RGB"), ratio=rng.uniform(0.3, 0.6)).convert("RGB")


EDITS: dict[str, Edit] = {
    "crop": crop,
    "jpeg": jpeg,
    "text": text,
    "emoji": emoji,
    "colour": colour,
    "grayscale": grayscale,
    "blur": blur,
    "flip": flip,
    "rotate90": rotate90,
    "rotate": rotate,
    "pad": pad,
    "resize": resize,
    "pixelize": pixelize,
}


def small_crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """A tight crop (10-30 % of the area), as in DISC2021's hardest queries."""
    w, h = img.size
    cw, ch = max(8, int(w * rng.uniform(0.3, 0.55))), max(8, int(h * rng.uniform(0.3, 0.55)))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def overlay_onto(img: Image.Image, canvas: Image.Image, rng: random.Random) -> Image.Image:
    """Paste `img`, scaled to 35-65 % of the canvas width, onto another photo (a DISC "overlay"
    query: most of the query's pixels belong to an image that is not the reference)."""
    canvas = canvas.convert("RGB").copy()
    scale = rng.uniform(0.35, 0.65) * canvas.width / img.width
    small = img.convert("RGB").resize(
        (max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.BILINEAR
    )
    if small.height > canvas.height:
        small = small.resize((max(8, small.width * canvas.height // small.height), canvas.height))
    x = rng.randint(0, canvas.width - small.width)
    y = rng.randint(0, canvas.height - small.height)
    canvas.paste(small, (x, y))
    return canvas


HARD_EDITS: dict[str, Edit] = {**EDITS, "small_crop": small_crop}


def random_copy(
    img: Image.Image,
    rng: random.Random,
    n_edits: tuple[int, int] = (1, 3),
    hard: bool = False,
    canvases: Sequence[Image.Image] = (),
) -> tuple[Image.Image, list[str]]:
    """A copy of `img` with distinct random edits applied in random order; returns the names.

    `hard` draws 2-4 edits (tight crops included) and, when `canvases` are given, pastes the
    result onto one of them a third of the time: closer to DISC2021's query mix, and hard enough
    that a compact student and its teacher no longer both score ~1.0.
    """
    edits = HARD_EDITS if hard else EDITS
    names = rng.sample(sorted(edits), rng.randint(*((2, 4) if hard else n_edits)))
    out = img.convert("RGB")
    for name in names:
        out = edits[name](out, rng)
    if hard and canvases and rng.random() < 1 / 3:
        out = overlay_onto(out, canvases[rng.randrange(len(canvases))], rng)
        names.append("overlay")
    return out, names
