"""Training views: the DISC "advanced" augmentation of SSCD, used by RDCD distillation.

Two views of one image must stay copies of each other while looking as different as the copies a
system meets in the wild: flips, rare 90/180/270 and free rotations, text and emoji overlays,
aggressive random resized crops, colour jitter, grayscale, blur and JPEG re-encoding. Parameters
and probabilities follow SSCD's published "advanced" setting (Pizzi et al. 2022).

Every random choice comes from one `random.Random`, so a (seed, image index, epoch) triple
reproduces a view exactly, with no global RNG state and no network access (fonts and emoji
are AugLy's bundled assets). Views come out as uint8 HWC arrays; normalisation happens on the
device, inside the model wrapper, so CPU workers ship 4x fewer bytes.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

# AugLy (fonts, emoji, the emoji overlay) is imported where an overlay is drawn, not here: a
# machine without it (a bare GPU box running benchmarks/gpu_check.py) can still make every other
# view, with `text_p=0, emoji_p=0`.


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each step, in the order they are applied."""

    size: int = 224
    flip_p: float = 0.5
    rot90_p: float = 0.05
    text_p: float = 0.1
    text_size: tuple[float, float] = (0.1, 0.3)  # fraction of the shorter side
    text_opacity: tuple[float, float] = (0.1, 1.0)
    emoji_p: float = 0.2
    emoji_size: tuple[float, float] = (0.1, 0.5)
    emoji_opacity: tuple[float, float] = (0.7, 1.0)
    free_rotation_p: float = 0.05
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_radius: tuple[float, float] = (1.0, 5.0)
    jpeg_p: float = 0.2
    jpeg_quality: tuple[int, int] = (0, 100)
    # DISC's "overlay" copies: the (cropped) view pasted onto another photo, which then makes up
    # most of the pixels. Not in SSCD's setting (0 here); the `copy` preset turns it on. Drawn
    # only when a canvas is given, so views made without one stay as they were.
    overlay_p: float = 0.0
    overlay_width: tuple[float, float] = (0.35, 0.7)  # of the canvas's side


# Named settings a view cache can be made with: SSCD's "advanced" augmentation, and a harder mix
# aimed at the copies the student measured weakest on (pool hold-out recall@1 of the stage-1
# student: 0.17 on overlays onto another photo, 0.26 on 90-degree rotations, 0.25 on tight
# crops; the teacher's 0.72, 0.91, 0.75)
PRESETS: dict[str, dict] = {
    "sscd": {},
    "copy": {"overlay_p": 0.5, "rot90_p": 0.25, "crop_scale": (0.05, 1.0)},
}


def preset(name: str, size: int) -> AugmentConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation {name!r}; one of {sorted(PRESETS)}")
    return AugmentConfig(size=size, **PRESETS[name])


_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 !?#@&"


def overlay_text(img: Image.Image, rng: random.Random, cfg: AugmentConfig) -> Image.Image:
    from rdcd.edits import font_files

    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    size = max(8, int(min(base.size) * rng.uniform(*cfg.text_size)))
    font = ImageFont.truetype(rng.choice(font_files()), size)
    text = "".join(rng.choice(_CHARS) for _ in range(rng.randint(3, 12)))
    alpha = int(255 * rng.uniform(*cfg.text_opacity))
    colour = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255), alpha)
    pos = (rng.uniform(0, 1) * base.width * 0.8, rng.uniform(0, 1) * base.height * 0.8)
    ImageDraw.Draw(layer).text(pos, text, font=font, fill=colour)
    return Image.alpha_composite(base, layer).convert("RGB")


def overlay_emoji(img: Image.Image, rng: random.Random, cfg: AugmentConfig) -> Image.Image:
    import augly.image as imaugs

    from rdcd.edits import emoji_files

    return imaugs.overlay_emoji(
        img,
        emoji_path=rng.choice(emoji_files()),
        emoji_size=rng.uniform(*cfg.emoji_size),
        opacity=rng.uniform(*cfg.emoji_opacity),
        x_pos=rng.uniform(0, 0.9),
        y_pos=rng.uniform(0, 0.9),
    ).convert("RGB")


def random_resized_crop(img: Image.Image, rng: random.Random, cfg: AugmentConfig) -> Image.Image:
    """Area share in `crop_scale`, aspect ratio log-uniform in `crop_ratio`; else a centre crop."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*cfg.crop_scale)
        ratio = math.exp(rng.uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            box = (x, y, x + cw, y + ch)
            break
    else:
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
    return img.resize((cfg.size, cfg.size), Image.Resampling.BILINEAR, box=box)


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    lut = [int((i + shift * 255) % 256) for i in range(256)]
    return Image.merge("HSV", (h.point(lut), s, v)).convert("RGB")


def colour_jitter(img: Image.Image, rng: random.Random, cfg: AugmentConfig) -> Image.Image:
    """Brightness, contrast, saturation and hue changes in a random order."""

    def factor(strength: float) -> float:
        return rng.uniform(1 - strength, 1 + strength)

    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(factor(cfg.brightness)),
        lambda im: ImageEnhance.Contrast(im).enhance(factor(cfg.contrast)),
        lambda im: ImageEnhance.Color(im).enhance(factor(cfg.saturation)),
        lambda im: _shift_hue(im, rng.uniform(-cfg.hue, cfg.hue)),
    ]
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


def jpeg(img: Image.Image, rng: random.Random, cfg: AugmentConfig) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=max(1, rng.randint(*cfg.jpeg_quality)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def overlay_onto(view: Image.Image, canvas: Image.Image, rng: random.Random,
                 cfg: AugmentConfig) -> Image.Image:  # fmt: skip
    """`view` scaled to a share of the side in `overlay_width` and pasted at a random place on a
    square crop of `canvas` (cfg.size): the whole view stays in, so the pair is still a copy."""
    side = min(canvas.size)
    x0, y0 = rng.randint(0, canvas.width - side), rng.randint(0, canvas.height - side)
    box = (x0, y0, x0 + side, y0 + side)
    out = canvas.convert("RGB").resize((cfg.size, cfg.size), Image.Resampling.BILINEAR, box=box)
    w = max(8, int(cfg.size * rng.uniform(*cfg.overlay_width)))
    h = max(8, min(cfg.size, int(w * math.exp(rng.uniform(-0.3, 0.3)))))
    out.paste(view.resize((w, h), Image.Resampling.BILINEAR),
              (rng.randint(0, cfg.size - w), rng.randint(0, cfg.size - h)))  # fmt: skip
    return out


def augment(
    img: Image.Image,
    rng: random.Random,
    cfg: AugmentConfig = AugmentConfig(),
    canvas: Image.Image | None = None,
) -> np.ndarray:
    """One training view of `img` as uint8 (size, size, 3); `canvas`: another photo the view may
    be pasted onto (with `cfg.overlay_p`)."""
    img = img.convert("RGB")
    if rng.random() < cfg.flip_p:
        img = ImageOps.mirror(img)
    if rng.random() < cfg.rot90_p:
        img = img.rotate(rng.choice((90, 180, 270)), expand=True)
    if rng.random() < cfg.text_p:
        img = overlay_text(img, rng, cfg)
    if rng.random() < cfg.emoji_p:
        img = overlay_emoji(img, rng, cfg)
    if rng.random() < cfg.free_rotation_p:
        img = img.rotate(rng.randint(0, 359), expand=True, resample=Image.Resampling.BILINEAR)
    img = random_resized_crop(img, rng, cfg)
    if canvas is not None and cfg.overlay_p and rng.random() < cfg.overlay_p:
        img = overlay_onto(img, canvas, rng, cfg)
    if rng.random() < cfg.jitter_p:
        img = colour_jitter(img, rng, cfg)
    if rng.random() < cfg.grayscale_p:
        img = ImageOps.grayscale(img).convert("RGB")
    if rng.random() < cfg.blur_p:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*cfg.blur_radius)))
    if rng.random() < cfg.jpeg_p:
        img = jpeg(img, rng, cfg)
    return np.asarray(img, dtype=np.uint8)


def view_rng(seed: int, index: int, epoch: int, view: int) -> random.Random:
    """The RNG of one view: a pure function of its coordinates, the same on any worker."""
    return random.Random(f"{seed}:{index}:{epoch}:{view}")


def two_views(
    img: Image.Image, seed: int, index: int, epoch: int, cfg: AugmentConfig = AugmentConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Two independent views of one image: the positive pair of contrastive training."""
    return (
        augment(img, view_rng(seed, index, epoch, 0), cfg),
        augment(img, view_rng(seed, index, epoch, 1), cfg),
    )
