"""Which photos an int8 student is calibrated on: real training-like images, never evaluation ones.

Static int8 quantisation fixes the scale of every activation from the ranges the fp32 model shows
on sample inputs, so those inputs must look like what the model will embed (photos, not noise),
and must never be evaluation images: a model calibrated on its test set would report figures it
cannot keep elsewhere. Sources, in order:

1. `RDCD_CALIBRATION`: a folder, `s3://` prefix or `.txt`/`.lst` manifest of the user's own
   training-like photos (a few hundred are enough);
2. the shared training pool, `$RDCD_SHARED_DATA/train_pool` (default `../shared/data` beside the
   repository): the developers' and CI's unlabeled training photos, disjoint from every set
   `benchmarks/distill_quality.py` evaluates on.

With neither, there is no int8 model and the student runs in fp32 (the caller logs it).

The list is a seeded sample of the sorted listing, so the default student's int8 model is the same
on every machine that has the pool; its digest (over file names, not machine-specific paths) is
recorded beside the built model. A slice of the sample is held out of calibration for the
agreement check that decides whether the int8 model may be used at all (`rdcd.models.export`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdcd import io as rio
from rdcd.decode import DecodeError, load_for_model

log = logging.getLogger(__name__)

CALIBRATION_ENV = "RDCD_CALIBRATION"
SHARED_ENV = "RDCD_SHARED_DATA"
CALIBRATION_IMAGES = 256  # MinMax ranges settle by ~200 photos; each costs a forward pass
CHECK_IMAGES = 64  # held out: int8 vs fp32 agreement is measured on these
SEED = 0
MIN_IMAGES = 24  # fewer than this gives ranges of a handful of photos: refuse instead
_MANIFESTS = (".txt", ".lst")


@dataclass(frozen=True)
class CalibrationSet:
    """URIs to calibrate on and URIs held out for the agreement check, and where they came from."""

    source: str
    calibrate: list[str]
    check: list[str]
    seed: int = SEED

    def digest(self) -> str:
        """sha256 over the file names (not paths: the pool lives elsewhere on another machine)."""
        names = [rio.stem(u) + os.path.splitext(u)[1] for u in self.calibrate]
        checks = [rio.stem(u) + os.path.splitext(u)[1] for u in self.check]
        text = "\n".join(["calibrate", *names, "check", *checks, f"seed={self.seed}"])
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> dict:
        return {
            "source": self.source,
            "images": len(self.calibrate),
            "check_images": len(self.check),
            "seed": self.seed,
            "digest": self.digest(),
        }


def shared_data_dir() -> Path:
    """`$RDCD_SHARED_DATA`, else `shared/data` beside the repository this package runs from."""
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _listing(source: str) -> list[str]:
    if source.lower().endswith(_MANIFESTS):
        base = source.rsplit("/", 1)[0] if "/" in source else "."
        lines = [ln.strip() for ln in rio.read_text(source).splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        absolute = (u if rio.is_s3(u) or u.startswith("/") else rio.join(base, u) for u in lines)
        return sorted(set(absolute))
    return sorted(f.uri for f in rio.list_files(source, rio.IMAGE_SUFFIXES))


def calibration_source() -> str | None:
    """The folder, prefix or manifest calibration reads from, by the precedence above."""
    explicit = os.environ.get(CALIBRATION_ENV)
    if explicit:
        return explicit
    pool = shared_data_dir() / "train_pool"
    return str(pool) if pool.is_dir() else None


def find_calibration_set(
    source: str | None = None,
    n: int = CALIBRATION_IMAGES,
    check: int = CHECK_IMAGES,
    seed: int = SEED,
) -> CalibrationSet | None:
    """A seeded sample of `source` (default: `calibration_source()`), split into calibration and
    check images; None when there is no source or it holds fewer than `MIN_IMAGES` photos."""
    source = source or calibration_source()
    if source is None:
        return None
    try:
        uris = _listing(source)
    except (rio.StorageError, OSError) as exc:
        log.warning("calibration images %s cannot be listed: %s", source, exc)
        return None
    if len(uris) < MIN_IMAGES:
        log.warning("calibration source %s holds %d images, fewer than %d", source, len(uris),
                    MIN_IMAGES)  # fmt: skip
        return None
    picked = random.Random(seed).sample(uris, min(len(uris), n + check))
    held = min(check, max(8, len(picked) // 5))
    return CalibrationSet(source, picked[held:], picked[:held], seed)


def _pixels(uri: str, size: int) -> np.ndarray | None:
    try:
        return load_for_model(rio.read_bytes(uri), size)
    except (DecodeError, rio.StorageError) as exc:
        log.debug("calibration: skipping %s: %s", uri, exc)
        return None


def load_pixels(uris: list[str], size: int, workers: int = 4) -> np.ndarray:
    """uint8 (N, size, size, 3) of the images that decode, in order (others are skipped)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = [p for p in pool.map(lambda u: _pixels(u, size), uris) if p is not None]
    if not decoded:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(decoded)
