"""The packaged default student (`--model default`): small, self-consistent, and a working
copy detector on real photos. Skips in a checkout that ships none."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from rdcd.decode import load_for_model
from rdcd.models import load_model
from rdcd.models.resolve import default_student_path


@pytest.fixture(scope="module")
def default_path() -> str:
    path = default_student_path()
    if path is None:
        pytest.skip("this checkout ships no default student")
    return path


def test_packaged_file_is_small_and_described(default_path):
    assert os.path.getsize(default_path) <= 10 * 1024 * 1024
    info = json.loads(open(os.path.splitext(default_path)[0] + ".json").read())
    model = load_model("default")
    assert model.fingerprint == info["fingerprint"] and model.dim == info["config"]["dim"]
    assert info["figures"]["rows"], "the figures it was shipped with travel beside it"


def test_default_student_tells_copies_from_other_photos(default_path, photos):
    model = load_model("default")
    size = model.image_size
    sims_copy, sims_other = [], []
    for a, b in [(photos[i], photos[i + 7]) for i in range(0, 40, 8)]:
        img = Image.open(a).convert("RGB")
        w, h = img.size
        buf = io.BytesIO()
        img.crop((w // 10, h // 10, w - w // 10, h - h // 10)).resize((w // 2, h // 2)).save(
            buf, "JPEG", quality=50
        )
        emb = model.embed(np.stack([load_for_model(open(a, "rb").read(), size),
                                    load_for_model(buf.getvalue(), size),
                                    load_for_model(open(b, "rb").read(), size)]))  # fmt: skip
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
        sims_copy.append(float(emb[0] @ emb[1]))
        sims_other.append(float(emb[0] @ emb[2]))
    assert min(sims_copy) > max(sims_other)
