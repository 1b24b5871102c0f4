"""Copy edits: seeded reproducibility and the hard (DISC-like) edits."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from rdcd.edits import overlay_onto, random_copy, small_crop


def _photo(seed: int, size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_same_seed_same_copy():
    img = _photo(0)
    a, names_a = random_copy(img, random.Random(7), hard=True, canvases=[_photo(1)])
    b, names_b = random_copy(img, random.Random(7), hard=True, canvases=[_photo(1)])
    assert names_a == names_b and np.array_equal(np.asarray(a), np.asarray(b))


def test_small_crop_keeps_a_tenth_to_a_third_of_the_area():
    img = _photo(0, (400, 300))
    for seed in range(20):
        out = small_crop(img, random.Random(seed))
        share = out.width * out.height / (400 * 300)
        assert 0.08 <= share <= 0.31


def test_overlay_pastes_the_copy_inside_the_canvas():
    img, canvas = _photo(0, (200, 100)), _photo(1, (300, 300))
    out = overlay_onto(img, canvas, random.Random(3))
    assert out.size == canvas.size
    diff = np.any(np.asarray(out) != np.asarray(canvas), axis=2)
    ys, xs = np.nonzero(diff)
    pasted_w = xs.max() - xs.min() + 1
    assert 0.3 * 300 <= pasted_w <= 0.7 * 300  # scaled to 35-65 % of the canvas width


def test_hard_copies_use_two_to_four_edits_and_sometimes_overlay():
    names = [random_copy(_photo(0), random.Random(s), hard=True, canvases=[_photo(1)])[1]
             for s in range(30)]  # fmt: skip
    assert all(2 <= len([n for n in ns if n != "overlay"]) <= 4 for ns in names)
    assert 3 <= sum("overlay" in ns for ns in names) <= 20
    easy = [random_copy(_photo(0), random.Random(s))[1] for s in range(30)]
    assert not any("overlay" in ns or "small_crop" in ns for ns in easy)
