"""The installed ONNX SSCD teacher on real photos (skips without shared data or the teacher)."""

from __future__ import annotations

import csv
import io

import numpy as np
from PIL import Image

from rdcd.decode import load_for_model


def _load(path, size=288) -> np.ndarray:
    return load_for_model(open(path, "rb").read(), size)


def test_resized_copy_scores_far_above_unrelated(teacher, photos):
    a, b = photos[0], photos[50]
    img = Image.open(a).convert("RGB")
    buf = io.BytesIO()
    img.resize((img.width // 3, img.height // 3)).save(buf, "JPEG", quality=60)
    copy = load_for_model(buf.getvalue(), 288)
    emb = teacher.embed(np.stack([_load(a), copy, _load(b)]))
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    same, other = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert same > 0.75 and other < 0.4 and same - other > 0.4  # 0.75: SSCD's P90 operating point


def test_reproduces_published_pair_cosines(teacher, shared_data, copy_pairs):
    """shared/data lists the teacher's cosine per pair; a correct decode + model path matches."""
    rows = [r for r in copy_pairs if not r["source"].startswith("gcompris")][:24]
    diffs = []
    for r in rows:
        e = teacher.embed(
            np.stack([_load(shared_data / r["original"]), _load(shared_data / r["copy"])])
        )
        diffs.append(abs(float(e[0] @ e[1]) - float(r["sscd_cosine"])))
    assert np.median(diffs) < 0.01 and max(diffs) < 0.03, diffs


def test_landmark_hard_negatives_stay_low(teacher, shared_data):
    with open(shared_data / "hard_negatives.csv") as f:
        rows = [r for r in csv.DictReader(f) if "different photograph" in r["why_not_a_copy"]]
    assert rows
    for r in rows[:6]:
        e = teacher.embed(
            np.stack([_load(shared_data / r["image_a"]), _load(shared_data / r["image_b"])])
        )
        assert float(e[0] @ e[1]) < 0.6, r


def test_load_model_caps_onnx_threads(teacher):
    from rdcd.models import load_model

    capped = load_model("sscd", threads=1, teacher_size=224)
    assert capped.session.get_session_options().intra_op_num_threads == 1
    assert capped.image_size == 224
    assert load_model("sscd").session.get_session_options().intra_op_num_threads == 0
