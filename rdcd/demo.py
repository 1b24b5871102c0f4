"""`rdcd demo`: the main job end to end on photos that ship with the install.

It builds a small DISC2021-layout set (references, edited copies as queries, unrelated edited
photos as distractor queries, a disjoint background set), then evaluates a model on it. The
photos come from installed packages (scikit-image's sample photos and matplotlib's sample
images), or from `--images DIR`. Later stages (training, embedding job, index, Serve, report)
plug in here as they land.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from rdcd import io as rio
from rdcd.decode import DecodeError, decode_image
from rdcd.edits import random_copy
from rdcd.evaluate import EvalConfig, evaluate
from rdcd.metrics import write_ground_truth
from rdcd.models.embedder import ModelError
from rdcd.models.resolve import DEFAULT_NAME, TEACHER_NAMES, default_student_path

log = logging.getLogger(__name__)

# Photographs (not synthetic patterns) among scikit-image's bundled data files.
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png", "retina.jpg",
    "rocket.jpg", "text.png",
)  # fmt: skip
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")


@dataclass
class DemoConfig:
    """`rdcd demo` options; the defaults run offline in about a minute on two cores."""

    out: str = "rdcd-demo"
    images: str | None = None
    model: str = "default"  # the packaged student; falls back to the teacher if not shipped
    compare_teacher: bool = True
    teacher: str | None = None
    copies_per_reference: int = 2
    reference_share: float = 0.55
    distractor_share: float = 0.2
    seed: int = 0
    progress: bool = True


def bundled_photos() -> list[str]:
    """Paths of the sample photos that installed packages ship."""
    import matplotlib
    import skimage

    skd = Path(skimage.__file__).parent / "data"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    found = [skd / n for n in SKIMAGE_PHOTOS] + [mpl / n for n in MATPLOTLIB_PHOTOS]
    return [str(p) for p in found if p.exists()]


def _save_jpeg(img: Image.Image, uri: str) -> None:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=92)
    rio.write_bytes(uri, buf.getvalue())


def _decodable(uri: str) -> bool:
    try:
        decode_image(rio.read_bytes(uri))
        return True
    except (DecodeError, rio.StorageError) as exc:
        log.warning("demo: skipping %s: %s", uri, exc)
        return False


def build_demo_set(
    photos: list[str],
    root: str,
    copies: int = 2,
    seed: int = 0,
    reference_share: float = 0.55,
    distractor_share: float = 0.2,
    hard: bool = False,
) -> dict[str, int]:
    """Write a DISC-layout folder under `root` from `photos`; returns its counts.

    Photos are split three ways, disjointly: references (each gets `copies` edited queries),
    distractor sources (edited queries with no reference: any match is a false positive) and
    background (for score normalisation, also with edited variants). `hard` makes queries with
    2-4 edits, tight crops and overlays onto the distractor photos (`rdcd.edits.random_copy`).
    """
    photos = [p for p in photos if _decodable(p)]
    if len(photos) < 6:
        raise ValueError(f"the demo needs at least 6 photos, got {len(photos)}")
    rng = random.Random(seed)
    photos = sorted(photos)
    rng.shuffle(photos)
    n_ref = max(2, int(len(photos) * reference_share))
    n_dis = max(1, int(len(photos) * distractor_share))
    refs, dis, bg = photos[:n_ref], photos[n_ref : n_ref + n_dis], photos[n_ref + n_dis :]
    images = {p: decode_image(rio.read_bytes(p)) for p in photos}
    if not rio.is_s3(root) and os.path.isdir(root):
        shutil.rmtree(root)  # a rebuilt set must not keep files of an earlier, larger one
    canvases = [images[p] for p in dis] if hard else []
    gt: list[tuple[str, str | None]] = []
    sources: list[tuple[str, str, str]] = []
    q = 0

    def add_query(src: str, ref_id: str | None) -> None:
        nonlocal q
        qid = f"Q{q:05d}"
        q += 1
        img, names = random_copy(images[src], rng, hard=hard, canvases=canvases)
        _save_jpeg(img, rio.join(root, "queries", f"{qid}.jpg"))
        gt.append((qid, ref_id))
        sources.append((qid, os.path.basename(src), "+".join(names)))

    for i, src in enumerate(refs):
        rid = f"R{i:06d}"
        _save_jpeg(images[src], rio.join(root, "references", f"{rid}.jpg"))
        sources.append((rid, os.path.basename(src), ""))
        for _ in range(copies):
            add_query(src, rid)
    for src in dis:
        for _ in range(max(1, copies // 2)):
            add_query(src, None)
    t = 0
    for src in bg:
        for variant in range(1 + copies):
            img = images[src] if variant == 0 else random_copy(images[src], rng)[0]
            _save_jpeg(img, rio.join(root, "train", f"T{t:06d}.jpg"))
            sources.append((f"T{t:06d}", os.path.basename(src), ""))
            t += 1
    write_ground_truth(rio.join(root, "ground_truth.csv"), gt)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("id", "source", "edits"), *sources])
    rio.write_text(rio.join(root, "sources.csv"), buf.getvalue())
    return {
        "references": len(refs),
        "queries": q,
        "background": t,
        "copies": sum(1 for _, r in gt if r),
        "distractors": sum(1 for _, r in gt if not r),
    }


def run_demo(cfg: DemoConfig) -> dict:
    """Build the demo set and evaluate `cfg.model` on it; returns the metrics dict."""
    if cfg.images:
        photos = [f.uri for f in rio.list_files(cfg.images, rio.IMAGE_SUFFIXES)]
    else:
        photos = bundled_photos()
    data = rio.join(cfg.out, "data")
    counts = build_demo_set(
        photos, data, cfg.copies_per_reference, cfg.seed, cfg.reference_share, cfg.distractor_share
    )
    log.info("demo set: %s", counts)
    model = cfg.model
    if model == DEFAULT_NAME and default_student_path() is None:
        log.warning("no packaged default student in this install: evaluating the teacher")
        model = "sscd"

    def run(spec: str, folder: str) -> dict:
        out = rio.join(cfg.out, folder)
        return evaluate(
            EvalConfig(
                disc_root=data, model=spec, teacher=cfg.teacher, out=out, progress=cfg.progress
            )
        )

    result = run(model, "eval")
    result["demo_set"] = counts
    if cfg.compare_teacher and model.lower() not in TEACHER_NAMES:
        try:
            result["teacher"] = run("sscd", "eval-teacher")
        except ModelError as exc:
            log.warning("no teacher to compare with: %s", exc)
    return result
