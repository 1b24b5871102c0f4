"""Training augmentation: shapes, reproducibility, and that each step really fires."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from rdcd.augment import AugmentConfig, augment, random_resized_crop, two_views


@pytest.fixture(scope="module")
def img() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


OFF = AugmentConfig(
    flip_p=0,
    rot90_p=0,
    text_p=0,
    emoji_p=0,
    free_rotation_p=0,
    jitter_p=0,
    grayscale_p=0,
    blur_p=0,
    jpeg_p=0,
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
)


def test_views_are_reproducible_and_distinct(img):
    a1, b1 = two_views(img, seed=7, index=3, epoch=0)
    a2, b2 = two_views(img, seed=7, index=3, epoch=0)
    assert a1.shape == (224, 224, 3) and a1.dtype == np.uint8
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert not np.array_equal(a1, b1)
    c, _ = two_views(img, seed=7, index=3, epoch=1)
    assert not np.array_equal(a1, c)


def test_identity_when_everything_is_off(img):
    out = augment(img, random.Random(0), OFF)
    expect = np.asarray(img.resize((224, 224), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - expect).max() <= 1


@pytest.mark.parametrize(
    "step", ["flip_p", "rot90_p", "text_p", "emoji_p", "free_rotation_p", "jitter_p",
             "grayscale_p", "blur_p", "jpeg_p"],
)  # fmt: skip
def test_each_step_changes_the_image(img, step):
    base = augment(img, random.Random(0), OFF)
    out = augment(img, random.Random(0), replace(OFF, **{step: 1.0}))
    assert np.abs(out.astype(int) - base).mean() > 0.5, step
    if step == "grayscale_p":
        assert np.array_equal(out[..., 0], out[..., 1])


def test_random_resized_crop_respects_scale(img):
    cfg = replace(OFF, crop_scale=(0.08, 0.1), size=64)
    out = random_resized_crop(img, random.Random(1), cfg)
    assert out.size == (64, 64)
    full = np.asarray(img.resize((64, 64)), dtype=float)
    assert np.abs(np.asarray(out, dtype=float) - full).mean() > 10  # a small crop, not the whole


def test_an_overlay_view_pastes_the_whole_view_onto_the_canvas(img):
    white = Image.new("RGB", (300, 200), (255, 255, 255))
    black = Image.new("RGB", (400, 300), (0, 0, 0))
    cfg = replace(OFF, overlay_p=1.0, size=96)
    for seed in range(5):
        out = augment(white, random.Random(seed), cfg, canvas=black)
        share = (out.min(axis=2) > 200).mean()  # the pasted view's pixels
        assert 0.35**2 * 0.7 < share < 0.75, share
        assert (out.max(axis=2) < 50).mean() > 0.25  # most of the rest is the canvas
    # no canvas, or SSCD's setting: the view is what it was before overlays existed
    assert np.array_equal(
        augment(img, random.Random(3), cfg),
        augment(img, random.Random(3), replace(cfg, overlay_p=0.0)),
    )
    plain = AugmentConfig()
    assert np.array_equal(
        augment(img, random.Random(4), plain), augment(img, random.Random(4), plain, canvas=black)
    )
