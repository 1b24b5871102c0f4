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
